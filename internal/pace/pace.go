// Package pace waits on one reusable timer, for the paced writers and
// readers that wait many times per stream (smoothing, paced cache replay,
// the stand-in model).
package pace

import (
	"context"
	"time"
)

// Sleeper waits on one reusable timer. The zero value is ready to use; a
// Sleeper is not safe for concurrent use.
type Sleeper struct {
	timer *time.Timer
}

// Sleep waits for d, or until ctx ends; it reports whether the whole wait
// passed.
func (s *Sleeper) Sleep(ctx context.Context, d time.Duration) bool {
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
