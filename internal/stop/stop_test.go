package stop

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/caddy-llm-stream/caddy-llm-stream/internal/redistest"
)

func TestRegistry(t *testing.T) {
	var stopped atomic.Int32
	remove := Add("gen-1", "alice", func() { stopped.Add(1) })
	if Local("gen-1", "bob") {
		t.Fatal("another owner stopped the generation")
	}
	if Local("gen-2", "alice") {
		t.Fatal("an unknown id was stopped")
	}
	if !Local("gen-1", "alice") || stopped.Load() != 1 {
		t.Fatal("the owner could not stop the generation")
	}
	if Local("gen-1", "alice") || stopped.Load() != 1 {
		t.Fatal("a generation is stopped at most once")
	}
	remove()

	remove = Add("gen-3", "", func() { stopped.Add(1) })
	remove()
	if Local("gen-3", "") {
		t.Fatal("a finished generation was stopped")
	}
}

func TestRedisBroadcast(t *testing.T) {
	srv := redistest.Start(t)
	// Two instances' broadcasters on one Redis (the registry is this
	// process's, so the one that holds the generation is whichever
	// receives the stop first; both acknowledge only what they stopped).
	a := NewRedis(redis.NewClient(&redis.Options{Addr: srv.Addr}), "test:", time.Second)
	defer a.Close()
	b := NewRedis(redis.NewClient(&redis.Options{Addr: srv.Addr}), "test:", time.Second)
	defer b.Close()

	stopped := make(chan struct{})
	remove := Add("gen-r", "team", func() { close(stopped) })
	defer remove()
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	ok, err := a.Stop(ctx, "gen-r", "team")
	if err != nil || !ok {
		t.Fatalf("stop through Redis: %v %v", ok, err)
	}
	select {
	case <-stopped:
	case <-time.After(time.Second):
		t.Fatal("the generation was not stopped")
	}

	// Nobody holds it any more: no acknowledgement, false when ctx ends.
	ctx2, cancel2 := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel2()
	if ok, err := b.Stop(ctx2, "gen-r", "team"); ok || err != nil {
		t.Fatalf("a stop nobody acknowledged: %v %v", ok, err)
	}

	// Redis down: the error is reported.
	srv.Stop()
	ctx3, cancel3 := context.WithTimeout(context.Background(), time.Second)
	defer cancel3()
	if _, err := b.Stop(ctx3, "gen-x", ""); err == nil {
		t.Fatal("no error with Redis down")
	}
}
