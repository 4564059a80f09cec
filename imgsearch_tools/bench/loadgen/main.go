// Command loadgen is imgsearch's compiled load generator: a gRPC client that costs the
// machine it shares with the servers far less CPU per call than a Python one.
//
// It sends serialized requests, read from a file, to one unary method, closed loop (-c workers,
// each waiting for its reply) or open loop (-qps, on a fixed clock), for a warm-up and then a
// measured phase. It uses no generated code: requests go out as the bytes Python serialized,
// and of each reply it reads three top-level fields, by number (a flag, a reason, a count).
// imgsearch_tools/bench/go_load.py builds it with Debian's golang-go and golang-google-grpc-dev
// when they are installed (see docs/guides/benchmarks.md) and reads its report.
//
// Protocol on stdout: the line "measure" when the measured phase starts, then one JSON object
// with every measured call (its end offset and latency in microseconds, status code, reply
// fields) and the process's CPU seconds over the measured phase.
package main

import (
	"bufio"
	"context"
	"encoding/binary"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// rawCodec sends and receives message bytes as they are.
type rawCodec struct{}

func (rawCodec) Marshal(v interface{}) ([]byte, error) { return *(v.(*[]byte)), nil }
func (rawCodec) Unmarshal(data []byte, v interface{}) error {
	*(v.(*[]byte)) = append((*(v.(*[]byte)))[:0], data...)
	return nil
}
func (rawCodec) Name() string { return "proto" }

type call struct {
	DoneUs    int64  `json:"done_us"` // end, from the start of the measured phase
	LatencyUs int64  `json:"latency_us"`
	Code      string `json:"code"`
	Flag      bool   `json:"flag"`             // the reply's -flag-field (a bool), when OK
	Reason    string `json:"reason,omitempty"` // the reply's -reason-field, when Flag is set
	Count     int    `json:"count"`            // occurrences of the reply's -count-field, when OK
	SlotUs    int64  `json:"from_slot_us"`     // latency from the send's slot on the clock (open loop)
}

type report struct {
	Calls    []call  `json:"calls"`
	Sent     int     `json:"sent"`
	Late     int     `json:"late_sends"`
	CPUS     float64 `json:"cpu_s"`
	WallS    float64 `json:"wall_s"`
	Warmup   int     `json:"warmup_calls"`
	Protocol int     `json:"protocol"`
}

// readRequests reads the file's messages: each a 4-byte little-endian length, then the bytes.
func readRequests(path string) ([][]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	r := bufio.NewReader(f)
	var out [][]byte
	for {
		var n uint32
		if err := binary.Read(r, binary.LittleEndian, &n); err == io.EOF {
			break
		} else if err != nil {
			return nil, fmt.Errorf("%s: message %d: %v", path, len(out)+1, err)
		}
		b := make([]byte, n)
		if _, err := io.ReadFull(r, b); err != nil {
			return nil, fmt.Errorf("%s: message %d: %v", path, len(out)+1, err)
		}
		out = append(out, b)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("%s: no messages", path)
	}
	return out, nil
}

// fields reads a reply's top-level bool field flagField and string field reasonField, and
// counts countField's occurrences.
func fields(b []byte, flagField, reasonField, countField uint64) (flag bool, reason string, count int) {
	for len(b) > 0 {
		key, n := binary.Uvarint(b)
		if n <= 0 {
			return
		}
		b = b[n:]
		number, wire := key>>3, key&7
		switch wire {
		case 0: // varint
			v, m := binary.Uvarint(b)
			if m <= 0 {
				return
			}
			b = b[m:]
			if number == flagField {
				flag = v != 0
			}
		case 1: // 64-bit
			if len(b) < 8 {
				return
			}
			b = b[8:]
		case 2: // length-delimited
			l, m := binary.Uvarint(b)
			if m <= 0 || uint64(len(b)-m) < l {
				return
			}
			if number == reasonField {
				reason = string(b[m : m+int(l)])
			}
			b = b[m+int(l):]
		case 5: // 32-bit
			if len(b) < 4 {
				return
			}
			b = b[4:]
		default:
			return
		}
		if number == countField {
			count++
		}
	}
	return
}

func cpuSeconds() float64 {
	var u syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &u)
	return float64(u.Utime.Nano()+u.Stime.Nano()) / 1e9
}

type runner struct {
	conns       []*grpc.ClientConn
	method      string
	requests    [][]byte
	timeout     time.Duration
	md          metadata.MD
	flagField   uint64
	reasonField uint64
	countField  uint64

	mu    sync.Mutex
	next  int
	calls []call
	start time.Time
}

func (r *runner) one(scheduled time.Time) {
	r.mu.Lock()
	i := r.next
	r.next++
	r.mu.Unlock()
	req := r.requests[i%len(r.requests)]
	conn := r.conns[i%len(r.conns)]
	ctx, cancel := context.WithTimeout(context.Background(), r.timeout)
	if r.md != nil {
		ctx = metadata.NewOutgoingContext(ctx, r.md)
	}
	var reply []byte
	sent := time.Now()
	err := conn.Invoke(ctx, r.method, &req, &reply, grpc.ForceCodec(rawCodec{}))
	done := time.Now()
	cancel()
	c := call{DoneUs: done.Sub(r.start).Microseconds(), LatencyUs: done.Sub(sent).Microseconds(),
		SlotUs: done.Sub(scheduled).Microseconds()}
	if err != nil {
		c.Code = strings.ToUpper(snake(status.Code(err).String()))
	} else {
		c.Code = "OK"
		flag, reason, count := fields(reply, r.flagField, r.reasonField, r.countField)
		c.Flag, c.Count = flag, count
		if flag {
			c.Reason = reason
		}
	}
	r.mu.Lock()
	r.calls = append(r.calls, c)
	r.mu.Unlock()
}

// snake turns Go's code names (DeadlineExceeded) into gRPC's (DEADLINE_EXCEEDED).
func snake(s string) string {
	var b strings.Builder
	for i, c := range s {
		if i > 0 && c >= 'A' && c <= 'Z' {
			b.WriteByte('_')
		}
		b.WriteRune(c)
	}
	return b.String()
}

// phase runs the load for d: closed loop with c workers, or open loop at qps; it returns the
// number of sends and of late sends (open loop: more than 2 ms behind the clock).
func (r *runner) phase(d time.Duration, c int, qps float64) (sent, late int) {
	r.mu.Lock()
	r.calls = r.calls[:0]
	r.start = time.Now()
	r.mu.Unlock()
	end := r.start.Add(d)
	var wg sync.WaitGroup
	if qps > 0 {
		interval := time.Duration(float64(time.Second) / qps)
		n := int(d.Seconds()*qps + 0.5)
		for i := 0; i < n; i++ {
			slot := r.start.Add(time.Duration(i) * interval)
			if wait := time.Until(slot); wait > 0 {
				time.Sleep(wait)
			} else if -wait > 2*time.Millisecond {
				late++
			}
			wg.Add(1)
			go func() { defer wg.Done(); r.one(slot) }()
			sent++
		}
	} else {
		var mu sync.Mutex
		for w := 0; w < c; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for time.Now().Before(end) {
					mu.Lock()
					sent++
					mu.Unlock()
					r.one(time.Now())
				}
			}()
		}
	}
	wg.Wait()
	return sent, late
}

type headers []string

func (h *headers) String() string     { return strings.Join(*h, ",") }
func (h *headers) Set(v string) error { *h = append(*h, v); return nil }

func main() {
	target := flag.String("target", "", "HOST:PORT")
	method := flag.String("method", "", "the full method path, /package.Service/Method")
	data := flag.String("data", "", "file of length-prefixed serialized requests")
	concurrency := flag.Int("c", 0, "closed loop: this many workers")
	qps := flag.Float64("qps", 0, "open loop: this many sends per second")
	connections := flag.Int("connections", 2, "connections, used round-robin")
	warmup := flag.Duration("warmup", time.Second, "warm-up, not measured")
	duration := flag.Duration("duration", 10*time.Second, "measured phase")
	timeout := flag.Duration("timeout", 2*time.Second, "deadline of each call")
	flagField := flag.Uint64("flag-field", 0, "number of a reply's bool field to report")
	reasonField := flag.Uint64("reason-field", 0, "number of a reply's string field to report when the bool is set")
	countField := flag.Uint64("count-field", 0, "number of a reply's repeated field to count")
	var md headers
	flag.Var(&md, "metadata", "KEY=VALUE sent with every call (repeatable)")
	flag.Parse()
	if *target == "" || *method == "" || *data == "" || (*concurrency > 0) == (*qps > 0) {
		fmt.Fprintln(os.Stderr, "error: need -target, -method, -data and exactly one of -c, -qps")
		os.Exit(2)
	}
	requests, err := readRequests(*data)
	if err != nil {
		fmt.Fprintln(os.Stderr, "error:", err)
		os.Exit(2)
	}
	r := &runner{method: *method, requests: requests, timeout: *timeout,
		flagField: *flagField, reasonField: *reasonField, countField: *countField}
	if len(md) > 0 {
		r.md = metadata.MD{}
		for _, kv := range md {
			k, v, ok := strings.Cut(kv, "=")
			if !ok {
				fmt.Fprintf(os.Stderr, "error: -metadata %q is not KEY=VALUE\n", kv)
				os.Exit(2)
			}
			r.md.Append(strings.ToLower(k), v)
		}
	}
	for i := 0; i < *connections; i++ {
		conn, err := grpc.Dial(*target, grpc.WithInsecure())
		if err != nil {
			fmt.Fprintln(os.Stderr, "error:", err)
			os.Exit(1)
		}
		defer conn.Close()
		r.conns = append(r.conns, conn)
	}
	warmupSent := 0
	if *warmup > 0 {
		warmupSent, _ = r.phase(*warmup, *concurrency, *qps)
	}
	fmt.Println("measure")
	cpu0 := cpuSeconds()
	t0 := time.Now()
	sent, late := r.phase(*duration, *concurrency, *qps)
	out := report{Calls: r.calls, Sent: sent, Late: late, CPUS: cpuSeconds() - cpu0,
		WallS: time.Since(t0).Seconds(), Warmup: warmupSent, Protocol: 1}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		fmt.Fprintln(os.Stderr, "error:", err)
		os.Exit(1)
	}
}
