// Command loadgen drives the wsroute_sync benchmark workload against one server.
//
// It is compiled (not Python) so that the load generator is never the
// bottleneck: bench.py reports its CPU share next to every result so a reader
// can check that claim. It speaks two protocols with the same JSON envelope:
//
//	ws   WebSocket text frames via gorilla/websocket (no compression offered)
//	tcp  newline-delimited JSON over plain TCP (the raw-TCP ceiling peer)
//
// Modes:
//
//	closed  -conns connections, one request in flight each, for -warmup then
//	        -duration; only round trips completed inside the window count.
//	churn   -conns loops of connect + handshake + one request + close
//	        handshake, timed like closed.
//	hold    open -conns connections (at most -dial-concurrency handshakes at
//	        once), then every connection sends one request at the same time;
//	        then hold them open until a line arrives on stdin (bench.py reads
//	        the server's memory meanwhile) or -hold-max passes.
//
// Protocol with bench.py on stdout: "EVENT <name>" lines mark the moments the
// runner must sample the server's /proc counters; the last line is
// "RESULT <json>". Diagnostics go to stderr. Every loop is bounded by time.
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/gorilla/websocket"
)

// Phases of a timed run. Workers read the phase when a round trip completes,
// so a round trip counts only if it finished inside the measurement window.
const (
	phaseWarmup int32 = iota
	phaseMeasure
	phaseStop
)

type config struct {
	addr               string
	proto              string
	mode               string
	conns              int
	payload            int
	warmup             time.Duration
	duration           time.Duration
	ioTimeout          time.Duration
	dialConcurrency    int
	requestConcurrency int
	holdMax            time.Duration
	closeWait          time.Duration
	maxErrorLogs       int64
}

// result is printed as the final "RESULT" line and parsed by bench.py.
type result struct {
	Mode       string           `json:"mode"`
	Proto      string           `json:"proto"`
	Conns      int              `json:"conns"`
	Payload    int              `json:"payload"`
	Count      int64            `json:"count"`    // round trips (closed, hold) or cycles (churn) in the window
	WindowSec  float64          `json:"window_s"` // wall time of the measurement window
	Rate       float64          `json:"rate"`     // count / window_s
	P50Ms      float64          `json:"p50_ms"`
	P90Ms      float64          `json:"p90_ms"`
	P99Ms      float64          `json:"p99_ms"`
	MaxMs      float64          `json:"max_ms"`
	CPUSec     float64          `json:"loadgen_cpu_s"`     // this process's user+sys CPU in the window
	CPUShare   float64          `json:"loadgen_cpu_share"` // CPUSec / WindowSec (1.0 = one full core)
	Errors     map[string]int64 `json:"errors"`
	ErrorTotal int64            `json:"error_total"`
	// Close-handshake outcomes. "unclean" means the server dropped TCP
	// without sending a Close frame; "slow" means it never closed TCP within
	// -close-wait after the Close frames were exchanged. Neither is a wrong
	// reply, so they are reported, not counted as errors.
	CloseClean   int64 `json:"close_clean"`
	CloseUnclean int64 `json:"close_unclean"`
	CloseSlow    int64 `json:"close_slow"`
	// hold mode only.
	ConnectSec  float64 `json:"connect_s,omitempty"`
	ConnectRate float64 `json:"connect_rate,omitempty"`
	AnswerSec   float64 `json:"answer_s,omitempty"`
	Held        int64   `json:"held,omitempty"`
}

// errorCounter keeps per-kind counts and logs the first few errors in full.
type errorCounter struct {
	mu     sync.Mutex
	counts map[string]int64
	logged int64
	limit  int64
}

func (e *errorCounter) add(kind string, err error) {
	e.mu.Lock()
	e.counts[kind]++
	logIt := e.logged < e.limit
	e.logged++
	e.mu.Unlock()
	if logIt {
		fmt.Fprintf(os.Stderr, "loadgen: %s: %v\n", kind, err)
	}
}

func (e *errorCounter) snapshot() (map[string]int64, int64) {
	e.mu.Lock()
	defer e.mu.Unlock()
	out := make(map[string]int64, len(e.counts))
	var total int64
	for k, v := range e.counts {
		out[k] = v
		total += v
	}
	return out, total
}

// cpuSeconds is this process's user+system CPU time, all threads included.
func cpuSeconds() float64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return float64(ru.Utime.Sec) + float64(ru.Utime.Usec)/1e6 +
		float64(ru.Stime.Sec) + float64(ru.Stime.Usec)/1e6
}

// stdoutMu keeps EVENT and RESULT lines whole when several goroutines print.
var stdoutMu sync.Mutex

func emit(line string) {
	stdoutMu.Lock()
	defer stdoutMu.Unlock()
	os.Stdout.WriteString(line + "\n")
}

// ---------------------------------------------------------------- payloads

// request builds one envelope whose payload is exactly cfg.payload bytes and
// unique per (connection, sequence), so a reply that belongs to another
// request can never pass verification. Only [a-z0-9-] are used, so no JSON
// escaping can make servers' encodings differ.
type request struct {
	payload  []byte
	tagLen   int
	envelope []byte
	expectA  []byte // {"message":"P"}   (compact encoders, Go, wsroute_sync)
	expectB  []byte // {"message": "P"}  (Python's json.dumps default separators)
}

func newRequest(size int) *request {
	return &request{payload: bytes.Repeat([]byte{'x'}, size)}
}

func (r *request) fill(conn int, seq int64) {
	tag := strconv.AppendInt([]byte("c"), int64(conn), 10)
	tag = append(tag, '-', 's')
	tag = strconv.AppendInt(tag, seq, 10)
	tag = append(tag, '-')
	n := copy(r.payload, tag) // a payload smaller than the tag is simply truncated
	// Restore filler where a longer earlier tag may have left digits.
	for i := n; i < len(r.payload) && i < r.tagLen; i++ {
		r.payload[i] = 'x'
	}
	r.tagLen = n
	r.envelope = append(r.envelope[:0], `{"Route":"echo","Params":{"message":"`...)
	r.envelope = append(r.envelope, r.payload...)
	r.envelope = append(r.envelope, `"}}`...)
	r.expectA = append(r.expectA[:0], `{"message":"`...)
	r.expectA = append(r.expectA, r.payload...)
	r.expectA = append(r.expectA, `"}`...)
	r.expectB = append(r.expectB[:0], `{"message": "`...)
	r.expectB = append(r.expectB, r.payload...)
	r.expectB = append(r.expectB, `"}`...)
}

// verify accepts the reply if it is a JSON object with exactly one member,
// "message", equal to the payload. Two byte-exact fast paths cover the
// encodings servers actually emit; anything else is parsed.
func (r *request) verify(reply []byte) error {
	if bytes.Equal(reply, r.expectA) || bytes.Equal(reply, r.expectB) {
		return nil
	}
	var obj map[string]interface{}
	if err := json.Unmarshal(reply, &obj); err != nil {
		return fmt.Errorf("reply is not JSON: %q", truncate(reply))
	}
	msg, ok := obj["message"].(string)
	if len(obj) != 1 || !ok || msg != string(r.payload) {
		return fmt.Errorf("wrong reply: %q", truncate(reply))
	}
	return nil
}

func truncate(b []byte) []byte {
	if len(b) > 120 {
		return b[:120]
	}
	return b
}

// ---------------------------------------------------------------- clients

// client is one connection in either protocol.
type client interface {
	roundTrip(r *request) error
	// closeHandshake performs the orderly close and reports how it went:
	// "clean", "unclean" or "slow" (see result.CloseUnclean/CloseSlow).
	closeHandshake(wait time.Duration) (string, error)
	abort()
	// startReader makes the connection answer control frames while held.
	startReader()
}

func bufferSize(payload int) int {
	// Big enough that gorilla writes a whole request as one frame: it
	// fragments a message whenever its write buffer fills, and one peer
	// (websocket-server) rejects continuation frames.
	n := payload + 1024
	if n < 4096 {
		n = 4096
	}
	return n
}

func dial(cfg *config) (client, error) {
	if cfg.proto == "tcp" {
		c, err := net.DialTimeout("tcp", cfg.addr, cfg.ioTimeout)
		if err != nil {
			return nil, err
		}
		// Go sets TCP_NODELAY by default; stated here because Nagle's
		// algorithm would otherwise dominate small request/reply latency.
		_ = c.(*net.TCPConn).SetNoDelay(true)
		return &tcpClient{conn: c, rd: bufio.NewReaderSize(c, bufferSize(cfg.payload)), timeout: cfg.ioTimeout}, nil
	}
	d := websocket.Dialer{
		HandshakeTimeout:  cfg.ioTimeout,
		ReadBufferSize:    bufferSize(cfg.payload),
		WriteBufferSize:   bufferSize(cfg.payload),
		EnableCompression: false,
	}
	c, _, err := d.Dial("ws://"+cfg.addr+"/", nil)
	if err != nil {
		return nil, err
	}
	return &wsClient{conn: c, timeout: cfg.ioTimeout}, nil
}

type wsClient struct {
	conn    *websocket.Conn
	timeout time.Duration
	in      chan readResult // set by startReader; nil while reads happen inline
}

type readResult struct {
	typ  int
	data []byte
	err  error
}

var errReadTimeout = errors.New("no message before the deadline")

// startReader keeps a read pending on a held connection, as a real client's
// read loop would: gorilla answers the server's keepalive pings only from
// inside a read, so a held connection that nobody reads looks dead to a
// server that pings and gets closed.
func (w *wsClient) startReader() {
	w.in = make(chan readResult, 1)
	go func() {
		for { // ends with the connection: every close makes ReadMessage fail
			typ, data, err := w.conn.ReadMessage()
			w.in <- readResult{typ, data, err}
			if err != nil {
				return
			}
		}
	}()
}

// next returns the next data message, from the reader goroutine if one runs.
func (w *wsClient) next(deadline time.Time) (int, []byte, error) {
	if w.in == nil {
		_ = w.conn.SetReadDeadline(deadline)
		return w.conn.ReadMessage()
	}
	timer := time.NewTimer(time.Until(deadline))
	defer timer.Stop()
	select {
	case r := <-w.in:
		return r.typ, r.data, r.err
	case <-timer.C:
		return 0, nil, errReadTimeout
	}
}

func (w *wsClient) roundTrip(r *request) error {
	deadline := time.Now().Add(w.timeout)
	_ = w.conn.SetWriteDeadline(deadline)
	if err := w.conn.WriteMessage(websocket.TextMessage, r.envelope); err != nil {
		return &kindError{"write", err}
	}
	typ, reply, err := w.next(deadline)
	if err != nil {
		return &kindError{"read", err}
	}
	if typ != websocket.TextMessage {
		return &kindError{"wrong_frame_type", fmt.Errorf("reply frame type %d, want text", typ)}
	}
	if err := r.verify(reply); err != nil {
		return &kindError{"wrong_reply", err}
	}
	return nil
}

func (w *wsClient) closeHandshake(wait time.Duration) (string, error) {
	defer w.conn.Close()
	deadline := time.Now().Add(w.timeout)
	msg := websocket.FormatCloseMessage(websocket.CloseNormalClosure, "")
	if err := w.conn.WriteControl(websocket.CloseMessage, msg, deadline); err != nil {
		return "", &kindError{"close_write", err}
	}
	// RFC 6455 section 7.1.1: after both Close frames, the server closes TCP
	// first; the client waits for that instead of closing, so TIME_WAIT lands
	// on the server and the measured cycle includes the server's teardown.
	for i := 0; i < 1000; i++ { // bounded: a well-behaved server sends nothing more
		_, _, err := w.next(deadline)
		if err == nil {
			continue
		}
		var ce *websocket.CloseError
		if errors.As(err, &ce) && ce.Code != websocket.CloseAbnormalClosure {
			break
		}
		if errors.As(err, &ce) {
			// gorilla reports TCP EOF before any Close frame as code 1006.
			return "unclean", nil
		}
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || isReset(err) {
			return "unclean", nil
		}
		return "", &kindError{"close_read", err}
	}
	raw := w.conn.UnderlyingConn()
	_ = raw.SetReadDeadline(time.Now().Add(wait))
	var buf [64]byte
	for i := 0; i < 1000; i++ {
		_, err := raw.Read(buf[:])
		if err == nil {
			continue
		}
		if errors.Is(err, io.EOF) || isReset(err) {
			return "clean", nil
		}
		if ne, ok := err.(net.Error); ok && ne.Timeout() {
			return "slow", nil
		}
		return "", &kindError{"close_read", err}
	}
	return "slow", nil
}

func (w *wsClient) abort() { _ = w.conn.Close() }

type tcpClient struct {
	conn    net.Conn
	rd      *bufio.Reader
	timeout time.Duration
	line    []byte
}

func (t *tcpClient) roundTrip(r *request) error {
	_ = t.conn.SetDeadline(time.Now().Add(t.timeout))
	t.line = append(append(t.line[:0], r.envelope...), '\n')
	if _, err := t.conn.Write(t.line); err != nil {
		return &kindError{"write", err}
	}
	reply, err := t.rd.ReadSlice('\n')
	if err == bufio.ErrBufferFull {
		// Longer than the buffer: assemble it (only for oversize replies).
		full := append([]byte(nil), reply...)
		for err == bufio.ErrBufferFull {
			reply, err = t.rd.ReadSlice('\n')
			full = append(full, reply...)
		}
		reply = full
	}
	if err != nil {
		return &kindError{"read", err}
	}
	if err := r.verify(bytes.TrimRight(reply, "\r\n")); err != nil {
		return &kindError{"wrong_reply", err}
	}
	return nil
}

func (t *tcpClient) closeHandshake(wait time.Duration) (string, error) {
	defer t.conn.Close()
	// The raw protocol's close handshake: half-close, then wait for the
	// server to see EOF and close its side.
	if err := t.conn.(*net.TCPConn).CloseWrite(); err != nil {
		return "", &kindError{"close_write", err}
	}
	_ = t.conn.SetReadDeadline(time.Now().Add(wait))
	var buf [64]byte
	for i := 0; i < 1000; i++ {
		_, err := t.rd.Read(buf[:])
		if err == nil {
			continue
		}
		if errors.Is(err, io.EOF) || isReset(err) {
			return "clean", nil
		}
		if ne, ok := err.(net.Error); ok && ne.Timeout() {
			return "slow", nil
		}
		return "", &kindError{"close_read", err}
	}
	return "slow", nil
}

func (t *tcpClient) abort() { _ = t.conn.Close() }

// startReader is a no-op: the raw protocol has no control frames to answer.
func (t *tcpClient) startReader() {}

type kindError struct {
	kind string
	err  error
}

func (k *kindError) Error() string { return k.kind + ": " + k.err.Error() }
func (k *kindError) Unwrap() error { return k.err }

func kindOf(err error, fallback string) string {
	var ke *kindError
	if errors.As(err, &ke) {
		return ke.kind
	}
	return fallback
}

func isReset(err error) bool {
	return errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}

// ---------------------------------------------------------------- latencies

type latencies []time.Duration

func (l latencies) percentileMs(p float64) float64 {
	if len(l) == 0 {
		return 0
	}
	i := int(p * float64(len(l)-1))
	return float64(l[i]) / 1e6
}

func fillLatency(res *result, all latencies) {
	sort.Slice(all, func(i, j int) bool { return all[i] < all[j] })
	res.P50Ms = all.percentileMs(0.50)
	res.P90Ms = all.percentileMs(0.90)
	res.P99Ms = all.percentileMs(0.99)
	res.MaxMs = all.percentileMs(1.0)
}

// maxSamplesPerWorker caps memory: at the rates a Python server reaches this
// is never hit in a few seconds, but the cap keeps a long run bounded.
const maxSamplesPerWorker = 4_000_000

// ---------------------------------------------------------------- modes

// timedWindow runs warmup then the measurement window, flipping phase and
// emitting the EVENT lines bench.py samples the server at.
func timedWindow(cfg *config, phase *int32) (float64, float64) {
	time.Sleep(cfg.warmup)
	cpu0 := cpuSeconds()
	t0 := time.Now()
	atomic.StoreInt32(phase, phaseMeasure)
	emit("EVENT window_start")
	time.Sleep(cfg.duration)
	atomic.StoreInt32(phase, phaseStop)
	window := time.Since(t0).Seconds()
	cpu := cpuSeconds() - cpu0
	emit("EVENT window_end")
	return window, cpu
}

func runClosed(cfg *config, errs *errorCounter, res *result) {
	// Connect everything first so the window measures steady-state traffic,
	// not handshakes.
	clients := dialAll(cfg, errs, false)
	var phase int32 = phaseWarmup
	var count int64
	samples := make([]latencies, len(clients))
	var wg sync.WaitGroup
	for i, c := range clients {
		if c == nil {
			continue
		}
		wg.Add(1)
		go func(i int, c client) {
			defer wg.Done()
			req := newRequest(cfg.payload)
			for seq := int64(0); atomic.LoadInt32(&phase) != phaseStop; seq++ {
				req.fill(i, seq)
				t := time.Now()
				if err := c.roundTrip(req); err != nil {
					errs.add(kindOf(err, "roundtrip"), err)
					c.abort()
					clients[i] = nil
					return
				}
				if atomic.LoadInt32(&phase) == phaseMeasure {
					atomic.AddInt64(&count, 1)
					if len(samples[i]) < maxSamplesPerWorker {
						samples[i] = append(samples[i], time.Since(t))
					}
				}
			}
		}(i, c)
	}
	res.WindowSec, res.CPUSec = timedWindow(cfg, &phase)
	wg.Wait()
	res.Count = atomic.LoadInt64(&count)
	var all latencies
	for _, s := range samples {
		all = append(all, s...)
	}
	fillLatency(res, all)
	closeAll(cfg, clients, errs, res)
}

func runChurn(cfg *config, errs *errorCounter, res *result) {
	var phase int32 = phaseWarmup
	var count int64
	samples := make([]latencies, cfg.conns)
	var wg sync.WaitGroup
	var mu sync.Mutex
	closeOutcomes := map[string]int64{}
	for i := 0; i < cfg.conns; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			req := newRequest(cfg.payload)
			local := map[string]int64{}
			defer func() {
				mu.Lock()
				for k, v := range local {
					closeOutcomes[k] += v
				}
				mu.Unlock()
			}()
			for seq := int64(0); atomic.LoadInt32(&phase) != phaseStop; seq++ {
				t := time.Now()
				c, err := dial(cfg)
				if err != nil {
					errs.add("connect", err)
					time.Sleep(10 * time.Millisecond) // don't spin on a refusing server
					continue
				}
				req.fill(i, seq)
				if err := c.roundTrip(req); err != nil {
					errs.add(kindOf(err, "roundtrip"), err)
					c.abort()
					continue
				}
				outcome, err := c.closeHandshake(cfg.closeWait)
				if err != nil {
					errs.add(kindOf(err, "close"), err)
					continue
				}
				if atomic.LoadInt32(&phase) == phaseMeasure {
					local[outcome]++
					atomic.AddInt64(&count, 1)
					if len(samples[i]) < maxSamplesPerWorker {
						samples[i] = append(samples[i], time.Since(t))
					}
				}
			}
		}(i)
	}
	res.WindowSec, res.CPUSec = timedWindow(cfg, &phase)
	wg.Wait()
	res.Count = atomic.LoadInt64(&count)
	var all latencies
	for _, s := range samples {
		all = append(all, s...)
	}
	fillLatency(res, all)
	res.CloseClean += closeOutcomes["clean"]
	res.CloseUnclean += closeOutcomes["unclean"]
	res.CloseSlow += closeOutcomes["slow"]
}

func runHold(cfg *config, errs *errorCounter, res *result) {
	cpu0 := cpuSeconds()
	t0 := time.Now()
	emit("EVENT window_start")
	clients := dialAll(cfg, errs, true)
	res.ConnectSec = time.Since(t0).Seconds()
	var held int64
	for _, c := range clients {
		if c != nil {
			held++
		}
	}
	if res.ConnectSec > 0 {
		res.ConnectRate = float64(held) / res.ConnectSec
	}
	// With every connection open, each sends its one request, at most
	// -request-concurrency at a time. Firing all of them at once instead
	// (-request-concurrency 0) measures CPython's GIL convoy more than the
	// server: thousands of threads leave recv() together and spin on the
	// GIL's 5 ms timed wait, and answers take tens of seconds for every peer.
	t1 := time.Now()
	lat := make(latencies, len(clients))
	ok := make([]bool, len(clients))
	limit := cfg.requestConcurrency
	if limit <= 0 {
		limit = len(clients)
	}
	sem := make(chan struct{}, limit)
	var wg sync.WaitGroup
	for i, c := range clients {
		if c == nil {
			continue
		}
		sem <- struct{}{}
		wg.Add(1)
		go func(i int, c client) {
			defer wg.Done()
			defer func() { <-sem }()
			req := newRequest(cfg.payload)
			req.fill(i, 0)
			t := time.Now()
			if err := c.roundTrip(req); err != nil {
				errs.add(kindOf(err, "roundtrip"), err)
				c.abort()
				clients[i] = nil
				return
			}
			lat[i] = time.Since(t)
			ok[i] = true
		}(i, c)
	}
	wg.Wait()
	res.AnswerSec = time.Since(t1).Seconds()
	var all latencies
	for i := range lat {
		if ok[i] {
			all = append(all, lat[i])
		}
	}
	res.Count = int64(len(all))
	res.Held = int64(len(all))
	res.WindowSec = time.Since(t0).Seconds()
	res.CPUSec = cpuSeconds() - cpu0
	fillLatency(res, all)
	emit("EVENT window_end")
	emit(fmt.Sprintf("EVENT holding %d", res.Held))
	// Wait for bench.py to finish sampling, bounded by -hold-max.
	released := make(chan struct{})
	go func() {
		_, _ = bufio.NewReader(os.Stdin).ReadString('\n')
		close(released)
	}()
	select {
	case <-released:
	case <-time.After(cfg.holdMax):
		fmt.Fprintln(os.Stderr, "loadgen: hold-max reached without release; closing")
	}
	closeAll(cfg, clients, errs, res)
}

// dialAll opens cfg.conns connections with at most cfg.dialConcurrency
// handshakes in flight, so a slow accept loop sees a queue, not a SYN flood.
// held: start each connection's reader as soon as it is open, since the
// first ones may wait a long time for the rest.
func dialAll(cfg *config, errs *errorCounter, held bool) []client {
	clients := make([]client, cfg.conns)
	sem := make(chan struct{}, cfg.dialConcurrency)
	var wg sync.WaitGroup
	for i := 0; i < cfg.conns; i++ {
		sem <- struct{}{}
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			defer func() { <-sem }()
			c, err := dial(cfg)
			if err != nil {
				errs.add("connect", err)
				return
			}
			if held {
				c.startReader()
			}
			clients[i] = c
		}(i)
	}
	wg.Wait()
	return clients
}

// closeAll performs close handshakes after the measurement (not timed), with
// bounded concurrency, and records the outcomes.
func closeAll(cfg *config, clients []client, errs *errorCounter, res *result) {
	sem := make(chan struct{}, cfg.dialConcurrency)
	var wg sync.WaitGroup
	var clean, unclean, slow int64
	for _, c := range clients {
		if c == nil {
			continue
		}
		sem <- struct{}{}
		wg.Add(1)
		go func(c client) {
			defer wg.Done()
			defer func() { <-sem }()
			outcome, err := c.closeHandshake(cfg.closeWait)
			if err != nil {
				errs.add(kindOf(err, "close"), err)
				return
			}
			switch outcome {
			case "clean":
				atomic.AddInt64(&clean, 1)
			case "unclean":
				atomic.AddInt64(&unclean, 1)
			case "slow":
				atomic.AddInt64(&slow, 1)
			}
		}(c)
	}
	wg.Wait()
	res.CloseClean += clean
	res.CloseUnclean += unclean
	res.CloseSlow += slow
}

func main() {
	cfg := &config{}
	flag.StringVar(&cfg.addr, "addr", "127.0.0.1:8000", "server host:port (loopback only)")
	flag.StringVar(&cfg.proto, "proto", "ws", "ws or tcp")
	flag.StringVar(&cfg.mode, "mode", "closed", "closed, churn or hold")
	flag.IntVar(&cfg.conns, "conns", 1, "connections (closed, hold) or parallel loops (churn)")
	flag.IntVar(&cfg.payload, "payload", 64, "payload bytes in Params.message")
	flag.DurationVar(&cfg.warmup, "warmup", time.Second, "traffic before the window opens")
	flag.DurationVar(&cfg.duration, "duration", 5*time.Second, "measurement window")
	flag.DurationVar(&cfg.ioTimeout, "io-timeout", 30*time.Second, "deadline for one handshake or round trip")
	flag.IntVar(&cfg.dialConcurrency, "dial-concurrency", 64, "handshakes in flight at once")
	flag.IntVar(&cfg.requestConcurrency, "request-concurrency", 64, "hold mode: requests in flight at once (0 = all at once)")
	flag.DurationVar(&cfg.holdMax, "hold-max", 120*time.Second, "hold mode: longest wait for release on stdin")
	flag.DurationVar(&cfg.closeWait, "close-wait", 2*time.Second, "how long to wait for the server to close TCP")
	flag.Int64Var(&cfg.maxErrorLogs, "max-error-logs", 10, "errors printed in full to stderr")
	flag.Parse()

	host, _, err := net.SplitHostPort(cfg.addr)
	if err != nil || !net.ParseIP(host).IsLoopback() {
		// The benchmark must never send traffic off this machine.
		fmt.Fprintf(os.Stderr, "loadgen: -addr must be a loopback host:port, got %q\n", cfg.addr)
		os.Exit(2)
	}
	if cfg.proto != "ws" && cfg.proto != "tcp" {
		fmt.Fprintf(os.Stderr, "loadgen: unknown -proto %q\n", cfg.proto)
		os.Exit(2)
	}
	if cfg.conns < 1 || cfg.payload < 1 || cfg.dialConcurrency < 1 {
		fmt.Fprintln(os.Stderr, "loadgen: -conns, -payload and -dial-concurrency must be >= 1")
		os.Exit(2)
	}

	errs := &errorCounter{counts: map[string]int64{}, limit: cfg.maxErrorLogs}
	res := &result{Mode: cfg.mode, Proto: cfg.proto, Conns: cfg.conns, Payload: cfg.payload}
	switch cfg.mode {
	case "closed":
		runClosed(cfg, errs, res)
	case "churn":
		runChurn(cfg, errs, res)
	case "hold":
		runHold(cfg, errs, res)
	default:
		fmt.Fprintf(os.Stderr, "loadgen: unknown -mode %q\n", cfg.mode)
		os.Exit(2)
	}
	if res.WindowSec > 0 {
		res.Rate = float64(res.Count) / res.WindowSec
		res.CPUShare = res.CPUSec / res.WindowSec
	}
	res.Errors, res.ErrorTotal = errs.snapshot()
	out, _ := json.Marshal(res)
	emit("RESULT " + string(out))
}
