package memo

import (
	"strconv"
	"sync"
	"testing"
)

func TestRemembersUpToMax(t *testing.T) {
	var m Map[string, int]
	m.Max = 3
	if _, ok := m.Get("a"); ok {
		t.Fatal("an empty map remembers")
	}
	for i := range 5 {
		if got := m.Put(strconv.Itoa(i), i*10); got != i*10 {
			t.Fatalf("Put returned %d", got)
		}
	}
	if m.Len() != 3 {
		t.Fatalf("%d entries, want at most 3", m.Len())
	}
	for i := range 3 {
		if v, ok := m.Get(strconv.Itoa(i)); !ok || v != i*10 {
			t.Errorf("entry %d: %d, %v", i, v, ok)
		}
	}
	if _, ok := m.Get("4"); ok {
		t.Error("an entry past the bound was kept")
	}
}

// Readers never see a torn map while writers add (run with -race).
func TestConcurrentReadersAndWriters(t *testing.T) {
	var m Map[int, int]
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 200 {
				k := w*1000 + i
				if v, ok := m.Get(k); ok && v != k {
					t.Errorf("key %d holds %d", k, v)
				}
				m.Put(k, k)
			}
		}()
	}
	wg.Wait()
	if m.Len() != DefaultMax {
		t.Fatalf("%d entries, want the bound %d", m.Len(), DefaultMax)
	}
}
