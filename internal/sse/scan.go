package sse

import "bytes"

// Scanning whole events out of bytes already read, for the relay's event
// filtering, the smoother and stored streams: the Parser observes a stream
// as it passes; these split and read events at rest.

// Fields returns the name and the joined data lines of one raw event (as
// EventEnd delimits it). data is a new slice when the event has several
// data lines.
func Fields(ev []byte) (name, data []byte) {
	seen := false // a data line was seen (it may have been empty)
	for len(ev) > 0 {
		end := LineEnd(ev)
		line := ev
		if end >= 0 {
			line = ev[:end]
		}
		if v, ok := bytes.CutPrefix(line, []byte("data:")); ok {
			if seen {
				data = append(data, '\n')
			}
			seen = true
			data = append(data, bytes.TrimPrefix(v, []byte(" "))...)
		} else if v, ok := bytes.CutPrefix(line, []byte("event:")); ok {
			name = bytes.TrimPrefix(v, []byte(" "))
		}
		if end < 0 {
			break
		}
		ev = ev[end+1:]
	}
	return name, data
}

// EventEnd returns the index after the blank line that ends the event
// starting at from, or -1. from is at the start of a line: a line ending
// there is itself the blank line (one that ends comments, or the first
// half of a CRLF whose other half came in a read of its own).
func EventEnd(b []byte, from int) int {
	if from < len(b) && (b[from] == '\n' || b[from] == '\r') {
		k := from + 1
		if b[from] == '\r' {
			if k == len(b) {
				return -1 // "\r" may still be followed by "\n"
			}
			if b[k] == '\n' {
				k++
			}
		}
		return k
	}
	for i := from; i < len(b); i++ {
		if b[i] != '\n' && b[i] != '\r' {
			j := LineEnd(b[i:])
			if j < 0 {
				return -1
			}
			i += j
		}
		// a line ends at i; a blank line follows when the next line is empty
		j := i + 1
		if b[i] == '\r' && j < len(b) && b[j] == '\n' {
			j++
		}
		if j < len(b) && (b[j] == '\n' || b[j] == '\r') {
			k := j + 1
			if b[j] == '\r' && k < len(b) && b[k] == '\n' {
				k++
			} else if b[j] == '\r' && k == len(b) {
				return -1 // "\r" may still be followed by "\n"
			}
			return k
		}
	}
	return -1
}
