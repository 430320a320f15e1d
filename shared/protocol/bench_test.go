package protocol

import "testing"

// BenchmarkDecode: the usual client frame, one subscribe with a resume
// position and a ref; and a reconnect's burst of 30 in one frame.
func BenchmarkDecode(b *testing.B) {
	one := []byte(`{"type":"subscribe","channel":"room-1","after":"1700000000000-0","ref":7}`)
	var thirty []byte
	for range 30 {
		thirty = append(append(thirty, one...), '\n')
	}
	for _, bc := range []struct {
		name  string
		frame []byte
		n     int
	}{{"one", one, 1}, {"thirty", thirty, 30}} {
		b.Run(bc.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				f := NewFrame(bc.frame)
				n := 0
				for f.More() {
					if _, err := f.Next(); err != nil {
						b.Fatal(err)
					}
					n++
				}
				if n != bc.n {
					b.Fatalf("%d requests, want %d", n, bc.n)
				}
			}
		})
	}
}
