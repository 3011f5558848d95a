package cache

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/caddy-llm-stream/caddy-llm-stream/internal/redistest"
)

func entryOf(n int) *Entry {
	return &Entry{ContentType: "text/event-stream", Body: bytes.Repeat([]byte("x"), n), Reads: []Read{{End: n, At: time.Millisecond}}}
}

// TestMemoryLRUBound fills a 100 KB cache with 10 KB entries: the bytes
// held never pass the bound, the least recently used go first, and a read
// keeps an entry.
func TestMemoryLRUBound(t *testing.T) {
	ctx := context.Background()
	const bound = 100_000
	c := NewMemory(bound)
	for i := range 30 {
		c.Set(ctx, fmt.Sprint(i), entryOf(10_000), time.Minute)
		if c.Size() > bound {
			t.Fatalf("after %d entries the cache holds %d bytes, over its bound", i+1, c.Size())
		}
		if i >= 1 {
			if e, _ := c.Get(ctx, "0"); e == nil {
				t.Fatalf("entry 0, read after every write, was evicted at %d", i)
			}
		}
	}
	if n := c.Len(); n != 9 {
		t.Fatalf("%d entries kept, want 9 (10,2xx bytes each in 100,000)", n)
	}
	for _, k := range []string{"1", "20"} {
		if e, _ := c.Get(ctx, k); e != nil {
			t.Fatalf("entry %s should have been evicted", k)
		}
	}
	if e, _ := c.Get(ctx, "29"); e == nil {
		t.Fatal("the newest entry is missing")
	}
	c.Set(ctx, "huge", entryOf(bound), time.Minute)
	if e, _ := c.Get(ctx, "huge"); e != nil || c.Len() != 9 {
		t.Fatal("an entry larger than the bound was kept")
	}
}

func TestMemoryExpiry(t *testing.T) {
	c := NewMemory(1 << 20)
	now := time.Now()
	c.now = func() time.Time { return now }
	c.Set(context.Background(), "k", entryOf(10), time.Second)
	now = now.Add(999 * time.Millisecond)
	if e, _ := c.Get(context.Background(), "k"); e == nil {
		t.Fatal("expired early")
	}
	now = now.Add(time.Millisecond)
	if e, _ := c.Get(context.Background(), "k"); e != nil || c.Size() != 0 {
		t.Fatal("kept past its ttl")
	}
}

func TestEncodeDecode(t *testing.T) {
	e := &Entry{Streamed: true, ContentType: "text/event-stream; charset=utf-8", Body: []byte("data: a\n\ndata: b\n\n"),
		Reads: []Read{{End: 9, At: 1500 * time.Microsecond}, {End: 18, At: 21 * time.Millisecond}}, UsageFrom: 9, UsageTo: 18}
	got, err := decode(encode(e))
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(*got) != fmt.Sprint(*e) {
		t.Fatalf("got %+v, want %+v", got, e)
	}
	for i := range len(encode(e)) - len(e.Body) {
		if _, err := decode(encode(e)[:i]); err == nil {
			t.Fatalf("a truncated entry (%d bytes) decoded", i)
		}
	}
}

func TestRedisStore(t *testing.T) {
	srv := redistest.Start(t)
	client := redis.NewClient(&redis.Options{Addr: srv.Addr})
	defer client.Close()
	r := NewRedis(client, "test:")
	ctx := context.Background()
	e := entryOf(1000)
	if err := r.Set(ctx, "k", e, 200*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	got, err := r.Get(ctx, "k")
	if err != nil || got == nil || !bytes.Equal(got.Body, e.Body) || got.ContentType != e.ContentType {
		t.Fatalf("got %+v, %v", got, err)
	}
	time.Sleep(300 * time.Millisecond)
	if got, err := r.Get(ctx, "k"); got != nil || err != nil {
		t.Fatalf("after the ttl: %+v, %v", got, err)
	}
}

// TestFlightFollowers: followers that join at different times all read the
// whole answer; a follower joining a flight that ends without an answer is
// told to ask itself.
func TestFlightFollowers(t *testing.T) {
	var g Group
	f, lead := g.Join("k")
	if !lead {
		t.Fatal("the first request must lead")
	}
	early, lead := g.Join("k")
	if lead || early != f {
		t.Fatal("the second request must follow")
	}
	got := make(chan string)
	follow := func(fl *Flight) {
		_, r, ok, err := fl.Wait(context.Background())
		if !ok || err != nil {
			got <- fmt.Sprint("no answer: ", err)
			return
		}
		b, err := io.ReadAll(r)
		fl.Leave()
		got <- string(b) + fmt.Sprint(err)
	}
	go follow(early)
	f.Start(true, "text/event-stream")
	f.Append([]byte("data: 1\n\n"), time.Millisecond)
	late, _ := g.Join("k")
	go follow(late)
	f.Append([]byte("data: 2\n\n"), 2*time.Millisecond)
	e := f.End(true)
	for range 2 {
		if s := <-got; s != "data: 1\n\ndata: 2\n\n<nil>" {
			t.Fatalf("follower read %q", s)
		}
	}
	if e == nil || string(e.Body) != "data: 1\n\ndata: 2\n\n" || len(e.Reads) != 2 || !e.Streamed {
		t.Fatalf("entry %+v", e)
	}
	// After End a new flight starts.
	f2, lead := g.Join("k")
	if !lead || f2 == f {
		t.Fatal("a new request after the end must lead a new flight")
	}
	waiter, _ := g.Join("k")
	go follow(waiter)
	f2.End(false)
	if s := <-got; !strings.HasPrefix(s, "no answer") {
		t.Fatalf("follower of a failed flight: %q", s)
	}
}

func TestFlightLeaderLeaves(t *testing.T) {
	var g Group
	f, _ := g.Join("k")
	cancelled := 0
	f.LeaderLeft(func() { cancelled++ })
	if cancelled != 1 {
		t.Fatal("a leader alone must cancel at once")
	}
	f2, _ := g.Join("j")
	fo, _ := g.Join("j")
	f2.LeaderLeft(func() { cancelled++ })
	if cancelled != 1 {
		t.Fatal("cancelled while a follower still reads")
	}
	fo.Leave()
	if cancelled != 2 {
		t.Fatal("not cancelled when the last follower left")
	}
}

// BenchmarkMemoryPerEntry reports the heap a stored 2,000-token answer
// (an OpenAI stream with usage, as read) costs, against its body size.
func BenchmarkMemoryPerEntry(b *testing.B) {
	body := stream2000()
	const n = 200
	for b.Loop() {
		c := NewMemory(1 << 30)
		var before, after runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&before)
		for i := range n {
			reads := make([]Read, 0, 2000)
			for j := 1; j <= 2000; j++ {
				reads = append(reads, Read{End: len(body) * j / 2000, At: time.Duration(j) * 20 * time.Millisecond})
			}
			c.Set(context.Background(), fmt.Sprint(i), &Entry{Streamed: true, ContentType: "text/event-stream", Body: append([]byte(nil), body...), Reads: reads}, time.Hour)
		}
		runtime.GC()
		runtime.ReadMemStats(&after)
		b.ReportMetric(float64(after.HeapAlloc-before.HeapAlloc)/n, "heap-B/entry")
		b.ReportMetric(float64(len(body)), "body-B")
		b.ReportMetric(float64(c.Size())/n, "counted-B/entry")
		runtime.KeepAlive(c)
	}
}

func stream2000() []byte {
	var s bytes.Buffer
	for i := range 2000 {
		fmt.Fprintf(&s, `data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1700000000,"model":"gpt-4o","system_fingerprint":"fp","choices":[{"index":0,"delta":{"content":" w%d"},"logprobs":null,"finish_reason":null}],"usage":null}`+"\n\n", i)
	}
	s.WriteString(`data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1700000000,"model":"gpt-4o","system_fingerprint":"fp","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":2000,"total_tokens":2009}}` + "\n\ndata: [DONE]\n\n")
	return s.Bytes()
}
