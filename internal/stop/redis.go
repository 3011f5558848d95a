package stop

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
)

// message is what instances publish on the stop channel: a request to stop
// a generation, or the acknowledgement of the instance that stopped it.
type message struct {
	Op    string `json:"op"` // "stop" or "stopped"
	ID    string `json:"id,omitempty"`
	Owner string `json:"owner,omitempty"`
	Nonce string `json:"nonce"`
}

// Redis broadcasts stops through a Redis pub/sub channel. Every instance
// subscribes; the one running the generation stops it and answers on the
// same channel, so the instance that was asked can tell the client whether
// the generation was found.
type Redis struct {
	client  redis.UniversalClient
	channel string
	sub     *redis.PubSub
	done    chan struct{}

	mu      sync.Mutex
	waiters map[string]chan struct{}
}

// NewRedis subscribes to `<prefix>stop`, waiting at most wait for the
// subscription to be confirmed (a server that is down is retried in the
// background), and serves stop requests from other instances until Close.
func NewRedis(client redis.UniversalClient, prefix string, wait time.Duration) *Redis {
	r := &Redis{
		client:  client,
		channel: prefix + "stop",
		done:    make(chan struct{}),
		waiters: map[string]chan struct{}{},
	}
	r.sub = client.Subscribe(context.Background(), r.channel)
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	_, _ = r.sub.Receive(ctx) // the subscription's confirmation
	cancel()
	go r.serve(r.sub.Channel())
	return r
}

func (r *Redis) serve(ch <-chan *redis.Message) {
	defer close(r.done)
	for msg := range ch {
		var m message
		if json.Unmarshal([]byte(msg.Payload), &m) != nil {
			continue
		}
		switch m.Op {
		case "stop":
			if Local(m.ID, m.Owner) {
				ack, _ := json.Marshal(message{Op: "stopped", Nonce: m.Nonce})
				ctx, cancel := context.WithTimeout(context.Background(), time.Second)
				_ = r.client.Publish(ctx, r.channel, ack).Err()
				cancel()
			}
		case "stopped":
			r.mu.Lock()
			if w, ok := r.waiters[m.Nonce]; ok {
				close(w)
				delete(r.waiters, m.Nonce)
			}
			r.mu.Unlock()
		}
	}
}

// Stop publishes a stop for id and waits, until ctx ends, for the instance
// that runs it to acknowledge. It reports false when none did.
func (r *Redis) Stop(ctx context.Context, id, owner string) (bool, error) {
	var b [12]byte
	_, _ = rand.Read(b[:])
	nonce := hex.EncodeToString(b[:])
	acked := make(chan struct{})
	r.mu.Lock()
	r.waiters[nonce] = acked
	r.mu.Unlock()
	defer func() {
		r.mu.Lock()
		delete(r.waiters, nonce)
		r.mu.Unlock()
	}()
	payload, _ := json.Marshal(message{Op: "stop", ID: id, Owner: owner, Nonce: nonce})
	if err := r.client.Publish(ctx, r.channel, payload).Err(); err != nil {
		return false, err
	}
	select {
	case <-acked:
		return true, nil
	case <-ctx.Done():
		return false, nil
	}
}

// Close ends the subscription.
func (r *Redis) Close() error {
	err := r.sub.Close()
	<-r.done
	return err
}
