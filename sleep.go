package llmstream

import (
	"context"
	"time"
)

// sleeper waits on one reusable timer, for the paced writers and readers
// that wait many times per stream (smoothing, paced cache replay, the mock
// model).
type sleeper struct {
	timer *time.Timer
}

// sleep waits for d, or until ctx ends; it reports whether the whole wait
// passed.
func (s *sleeper) sleep(ctx context.Context, d time.Duration) bool {
	if d <= 0 {
		return ctx.Err() == nil
	}
	if s.timer == nil {
		s.timer = time.NewTimer(d)
	} else {
		s.timer.Reset(d)
	}
	select {
	case <-s.timer.C:
		return true
	case <-ctx.Done():
		return false
	}
}
