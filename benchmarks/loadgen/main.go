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
//	fanout  open -conns connections, then ask the server on one more (the
//	        control connection) to broadcast a -fanout-size message every
//	        -fanout-interval ("fanout_start"); for -warmup then -duration,
//	        every client reads the broadcasts and records the delivery
//	        latency: its receive time minus the send time the message
//	        carries (wall clock ns, same host). Then "fanout_stop", and the
//	        clients close.
//
// -source-addrs N spreads the connections over the loopback source addresses
// 127.0.0.1 .. 127.0.0.N, each with its own ephemeral port range.
//
// Protocol with bench.py on stdout: "EVENT <name>" lines mark the moments the
// runner must sample the server's /proc counters; the last line is
// "RESULT <json>". Diagnostics go to stderr. Every loop is bounded by time.
package main

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
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
	sourceAddrs        int
	fanoutInterval     time.Duration
	fanoutSize         int
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
	// fanout mode only. Count, Rate and the latencies are of the broadcasts
	// received inside the window. Ticks are the broadcasts the server sent
	// inside it (by the send time they carry: highest sequence number minus
	// lowest, plus one); Expected is Ticks * Held, and SentDelivered how many
	// of those reached their client before the run ended. Missed counts gaps
	// in the sequence numbers a client received.
	Ticks         int64   `json:"ticks,omitempty"`
	TickRate      float64 `json:"tick_rate,omitempty"`
	Expected      int64   `json:"expected,omitempty"`
	SentDelivered int64   `json:"sent_delivered,omitempty"`
	Missed        int64   `json:"missed,omitempty"`
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

// raiseFdLimit lifts the soft RLIMIT_NOFILE to the hard one (10,000 sockets
// need it; Go 1.19 does this itself for programs that import os, said here
// so that it doesn't depend on the toolchain).
func raiseFdLimit() {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err == nil && lim.Cur < lim.Max {
		lim.Cur = lim.Max
		_ = syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim)
	}
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

// dialSeq picks the next source address for -source-addrs.
var dialSeq uint64

// netDialer returns the dialer for the next connection: with -source-addrs N,
// bound to 127.0.0.1+(k mod N). IP_BIND_ADDRESS_NO_PORT leaves the port choice
// to connect(), so each source address has the whole ephemeral range per
// destination instead of one port per bind.
func netDialer(cfg *config) *net.Dialer {
	d := &net.Dialer{Timeout: cfg.ioTimeout}
	if cfg.sourceAddrs > 1 {
		k := atomic.AddUint64(&dialSeq, 1) % uint64(cfg.sourceAddrs)
		d.LocalAddr = &net.TCPAddr{IP: net.IPv4(127, 0, 0, byte(1+k))}
		d.Control = func(network, address string, c syscall.RawConn) error {
			var serr error
			err := c.Control(func(fd uintptr) {
				const ipBindAddressNoPort = 24 // linux/in.h
				serr = syscall.SetsockoptInt(int(fd), syscall.IPPROTO_IP, ipBindAddressNoPort, 1)
			})
			if err != nil {
				return err
			}
			return serr
		}
	}
	return d
}

func dial(cfg *config) (client, error) {
	if cfg.proto == "tcp" {
		c, err := netDialer(cfg).Dial("tcp", cfg.addr)
		if err != nil {
			return nil, err
		}
		// Go sets TCP_NODELAY by default; stated here because Nagle's
		// algorithm would otherwise dominate small request/reply latency.
		_ = c.(*net.TCPConn).SetNoDelay(true)
		return &tcpClient{conn: c, rd: bufio.NewReaderSize(c, bufferSize(cfg.payload)), timeout: cfg.ioTimeout}, nil
	}
	d := websocket.Dialer{
		NetDial:           netDialer(cfg).Dial,
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

// ---------------------------------------------------------------- fan-out

// parseBroadcast reads seq and t from {"seq":N,"t":T,...}, the fixed layout
// every fan-out peer sends (servers/_common.py fanout_message and
// servers/gorilla/main.go broadcastMessage).
func parseBroadcast(b []byte) (seq, t int64, ok bool) {
	const seqKey, tKey = `{"seq":`, `,"t":`
	if !bytes.HasPrefix(b, []byte(seqKey)) {
		return 0, 0, false
	}
	seq, i, ok := digits(b, len(seqKey))
	if !ok || !bytes.HasPrefix(b[i:], []byte(tKey)) {
		return 0, 0, false
	}
	t, _, ok = digits(b, i+len(tKey))
	return seq, t, ok
}

func digits(b []byte, i int) (int64, int, bool) {
	start := i
	var v int64
	for i < len(b) && b[i] >= '0' && b[i] <= '9' && i-start < 19 {
		v = v*10 + int64(b[i]-'0')
		i++
	}
	return v, i, i > start
}

// fanoutWindow is the measurement window in wall-clock ns, [start, end),
// end = start + -duration: a broadcast counts as received in it by its
// receive time, as sent in it by the send time it carries.
type fanoutWindow struct {
	closing    int32 // 1 once Close frames are being sent
	start, end int64 // start is stored (atomically) after end
}

// fanConn is one client once its handshake is done: a socket the epoll
// readers read and that runFanout writes its Close frame to. Only the reader
// goroutine its fd is registered with touches the rest.
type fanConn struct {
	fd   int
	buf  []byte // bytes read but not yet a whole frame
	done chan struct{}
	// Received inside the window (receive time).
	count   int64
	samples latencies
	// Sent inside the window (the send time they carry), received at any time
	// before the end of the run.
	sentCount      int64
	minSeq, maxSeq int64 // of those; -1 = none
	missed         int64 // gaps in the sequence numbers
	last           int64
	// Close handshake: 0 open, 1 our Close sent, 2 the server's Close read.
	// Atomic: the closing goroutine moves it to 1, the reader to 2.
	closeState int32
	deadline   int64 // unix ns, atomic: when the close handshake's current step times out
	outcome    string
	finished   int32      // atomic: 1 once the reader let go of the socket
	wmu        sync.Mutex // our writes: Pongs from the reader, the Close frame
}

// fanoutReaders reads every client's broadcasts with one goroutine per core,
// each polling its own epoll set once per readerPause, instead of a goroutine
// per connection: at thousands of clients, a goroutine wake-up per message
// cost the load generator 11-13 µs a message, most of a core on this 2-core
// machine, taken from the server it measures (a blocking epoll_wait on a
// locked thread still cost ~0.8 context switches a message). Each socket is
// taken out of Go's own poller (its fd duplicated, the gorilla connection
// that made the handshake closed), or every message would also wake Go's
// netpoller thread. Server frames are parsed here (unmasked, unfragmented:
// the 64-byte broadcasts always are), and the client's Close frame is
// written here.
//
// Receive times are the kernel's (SO_TIMESTAMPNS, CLOCK_REALTIME: when the
// data reached the client's socket), so neither the pause between polls nor
// the readers' own scheduling shows up in the latencies.
type fanoutReaders struct {
	cfg   *config
	errs  *errorCounter
	win   *fanoutWindow
	epfds []int
	mu    []sync.Mutex // per reader: guards conns[k], which add appends to
	conns [][]*fanConn // per reader; an epoll event's Fd is the index
	wg    sync.WaitGroup
	stop  int32
}

func newFanoutReaders(cfg *config, errs *errorCounter, win *fanoutWindow, n int) (*fanoutReaders, error) {
	r := &fanoutReaders{cfg: cfg, errs: errs, win: win, conns: make([][]*fanConn, n), mu: make([]sync.Mutex, n)}
	for i := 0; i < n; i++ {
		fd, err := syscall.EpollCreate1(syscall.EPOLL_CLOEXEC)
		if err != nil {
			r.closeEpoll()
			return nil, err
		}
		r.epfds = append(r.epfds, fd)
	}
	return r, nil
}

func (r *fanoutReaders) closeEpoll() {
	for _, fd := range r.epfds {
		_ = syscall.Close(fd)
	}
}

// add hands one connection to reader k: its socket, duplicated, leaves the
// gorilla connection (closed, which takes the original fd out of Go's
// poller) for reader k's epoll set. Called before the server sends anything
// after the handshake, so gorilla has buffered nothing.
func (r *fanoutReaders) add(k int, w *wsClient) (*fanConn, error) {
	c := &fanConn{fd: -1, minSeq: -1, maxSeq: -1, last: -1, done: make(chan struct{})}
	sc, ok := w.conn.UnderlyingConn().(syscall.Conn)
	if !ok {
		return nil, errors.New("not a socket")
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return nil, err
	}
	var derr error
	if err := raw.Control(func(fd uintptr) { c.fd, derr = syscall.Dup(int(fd)) }); err != nil {
		return nil, err
	}
	if derr != nil {
		return nil, derr
	}
	syscall.CloseOnExec(c.fd)
	_ = w.conn.Close() // the socket lives on in c.fd, non-blocking, as Go left it
	if err := syscall.SetsockoptInt(c.fd, syscall.SOL_SOCKET, soTimestampNS, 1); err != nil {
		_ = syscall.Close(c.fd)
		return nil, err
	}
	// Appended before it is watched, so a reader that gets an event for it
	// finds it in the slice it reads after epoll_wait returns.
	r.mu[k].Lock()
	defer r.mu[k].Unlock()
	ev := syscall.EpollEvent{Events: syscall.EPOLLIN | syscall.EPOLLRDHUP, Fd: int32(len(r.conns[k]))}
	r.conns[k] = append(r.conns[k], c)
	if err := syscall.EpollCtl(r.epfds[k], syscall.EPOLL_CTL_ADD, c.fd, &ev); err != nil {
		r.conns[k] = r.conns[k][:len(r.conns[k])-1]
		_ = syscall.Close(c.fd)
		return nil, err
	}
	return c, nil
}

func (r *fanoutReaders) run() {
	for k := range r.epfds {
		r.wg.Add(1)
		go r.loop(k)
	}
}

// readerPause: how long a reader sleeps between polls, so that each poll
// takes many messages; the kernel's timestamps keep it out of the latencies,
// and it is far below one 20 ms tick.
const readerPause = time.Millisecond

// soTimestampNS is SO_TIMESTAMPNS (asm-generic/socket.h); the control message
// it adds to recvmsg has the same type.
const soTimestampNS = 35

func (r *fanoutReaders) loop(k int) {
	defer r.wg.Done()
	events := make([]syscall.EpollEvent, 1024)
	buf := make([]byte, 64*1024)
	oob := make([]byte, 256)
	var swept int64
	for atomic.LoadInt32(&r.stop) == 0 {
		n, err := syscall.EpollWait(r.epfds[k], events, 0) // never blocks
		if err != nil && err != syscall.EINTR {
			r.errs.add("epoll", err)
			return
		}
		r.mu[k].Lock()
		conns := r.conns[k]
		r.mu[k].Unlock()
		now := time.Now().UnixNano()
		for _, ev := range events[:max(n, 0)] {
			if c := conns[ev.Fd]; !c.isFinished() {
				r.readOnce(c, buf, oob, now)
			}
		}
		if n < len(events) {
			time.Sleep(readerPause) // else more are ready: poll again at once
		}
		if atomic.LoadInt32(&r.win.closing) == 1 && now-swept > int64(100*time.Millisecond) {
			swept = now
			for _, c := range conns { // time-outs of close handshakes
				state, deadline := atomic.LoadInt32(&c.closeState), atomic.LoadInt64(&c.deadline)
				if !c.isFinished() && state > 0 && deadline > 0 && now > deadline {
					if state == 2 {
						r.finish(c, "slow")
					} else {
						r.errs.add("close_read", errors.New("no Close frame from the server before the deadline"))
						r.finish(c, "")
					}
				}
			}
		}
	}
}

func max(a, b int) int {
	if a > b {
		return a
	}
	return b
}

func (c *fanConn) isFinished() bool { return atomic.LoadInt32(&c.finished) == 1 }

func (r *fanoutReaders) finish(c *fanConn, outcome string) {
	c.outcome = outcome
	atomic.StoreInt32(&c.finished, 1)
	for _, fd := range r.epfds { // whichever set holds it
		_ = syscall.EpollCtl(fd, syscall.EPOLL_CTL_DEL, c.fd, nil)
	}
	close(c.done)
}

// readOnce reads what the socket holds (level-triggered: more is reported
// again) and handles every whole frame in it.
func (r *fanoutReaders) readOnce(c *fanConn, buf, oob []byte, now int64) {
	n, oobn, _, _, err := syscall.Recvmsg(c.fd, buf, oob, 0)
	if err == syscall.EAGAIN || err == syscall.EINTR {
		return
	}
	if ts := rxTimestamp(oob[:oobn]); ts > 0 {
		now = ts
	}
	if n <= 0 { // EOF or error
		closing := atomic.LoadInt32(&r.win.closing) == 1
		switch {
		case atomic.LoadInt32(&c.closeState) == 2: // both Close frames exchanged: the server closed TCP
			r.finish(c, "clean")
		case closing && (err == nil || isReset(err)):
			r.finish(c, "unclean")
		default:
			if err == nil {
				err = io.EOF
			}
			r.errs.add("fanout_read", fmt.Errorf("server ended a reading client: %w", err))
			r.finish(c, "")
		}
		return
	}
	data := buf[:n]
	if len(c.buf) > 0 {
		c.buf = append(c.buf, data...)
		data = c.buf
	}
	for {
		payload, op, size, ferr := nextFrame(data)
		if ferr != nil {
			r.errs.add("bad_frame", ferr)
			r.finish(c, "")
			return
		}
		if size == 0 {
			break // incomplete
		}
		r.frame(c, op, payload, now)
		data = data[size:]
		if c.isFinished() {
			return
		}
	}
	c.buf = append(c.buf[:0], data...)
}

// rxTimestamp finds the SCM_TIMESTAMPNS control message: the time the last
// segment read arrived. All frames of one read get it; they arrived since
// the previous read of the socket, normally within one readerPause, so a
// latency is overstated by about that much at most. 0 if absent.
func rxTimestamp(oob []byte) int64 {
	const hdr = 16 // struct cmsghdr on 64-bit Linux: len uint64, level int32, type int32
	for len(oob) >= hdr {
		l := int(binary.LittleEndian.Uint64(oob[0:8]))
		level := int32(binary.LittleEndian.Uint32(oob[8:12]))
		typ := int32(binary.LittleEndian.Uint32(oob[12:16]))
		if l < hdr || l > len(oob) {
			return 0
		}
		if level == syscall.SOL_SOCKET && typ == soTimestampNS && l >= hdr+16 {
			sec := int64(binary.LittleEndian.Uint64(oob[hdr : hdr+8]))
			nsec := int64(binary.LittleEndian.Uint64(oob[hdr+8 : hdr+16]))
			return sec*1e9 + nsec
		}
		oob = oob[(l+7)&^7:]
	}
	return 0
}

// pong answers a Ping with a masked Pong (all-zero key, so the payload goes
// as it is), unless our Close frame has gone out.
func (r *fanoutReaders) pong(c *fanConn, payload []byte) {
	if len(payload) > 125 {
		return // not a valid Ping; nothing a client must answer
	}
	frame := append([]byte{0x8a, 0x80 | byte(len(payload)), 0, 0, 0, 0}, payload...)
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if atomic.LoadInt32(&c.closeState) != 0 {
		return
	}
	if _, err := syscall.Write(c.fd, frame); err != nil {
		r.errs.add("pong_write", err)
	}
}

// nextFrame parses one unmasked, final server frame; size 0 = need more bytes.
func nextFrame(b []byte) (payload []byte, op byte, size int, err error) {
	if len(b) < 2 {
		return nil, 0, 0, nil
	}
	fin, op, masked := b[0]&0x80 != 0, b[0]&0x0f, b[1]&0x80 != 0
	if !fin || masked || b[0]&0x70 != 0 {
		return nil, 0, 0, fmt.Errorf("unexpected frame header %#x %#x (fragmented, masked or RSV)", b[0], b[1])
	}
	n, head := int(b[1]&0x7f), 2
	switch n {
	case 126:
		if len(b) < 4 {
			return nil, 0, 0, nil
		}
		n, head = int(b[2])<<8|int(b[3]), 4
	case 127:
		if len(b) < 10 {
			return nil, 0, 0, nil
		}
		var v uint64
		for _, x := range b[2:10] {
			v = v<<8 | uint64(x)
		}
		if v > 1<<20 {
			return nil, 0, 0, fmt.Errorf("frame of %d bytes", v)
		}
		n, head = int(v), 10
	}
	if len(b) < head+n {
		return nil, 0, 0, nil
	}
	return b[head : head+n], op, head + n, nil
}

func (r *fanoutReaders) frame(c *fanConn, op byte, payload []byte, now int64) {
	switch op {
	case websocket.TextMessage:
	case websocket.CloseMessage:
		if atomic.LoadInt32(&c.closeState) == 1 {
			atomic.StoreInt64(&c.deadline, now+int64(r.cfg.closeWait))
			atomic.StoreInt32(&c.closeState, 2)
			return
		}
		r.errs.add("fanout_read", fmt.Errorf("server closed a reading client: %q", truncate(payload)))
		r.finish(c, "")
		return
	case websocket.PingMessage:
		r.pong(c, payload) // wsroute_sync pings every 20 s by default
		return
	case websocket.PongMessage:
		return
	default:
		r.errs.add("wrong_frame_type", fmt.Errorf("broadcast frame type %d, want text", op))
		return
	}
	seq, sent, ok := parseBroadcast(payload)
	if !ok {
		r.errs.add("wrong_broadcast", fmt.Errorf("not a broadcast: %q", truncate(payload)))
		return
	}
	if c.last >= 0 && seq > c.last+1 {
		c.missed += seq - c.last - 1
	}
	c.last = seq
	if start := atomic.LoadInt64(&r.win.start); start > 0 && now >= start && now < r.win.end {
		c.count++
		if len(c.samples) < maxSamplesPerWorker {
			c.samples = append(c.samples, time.Duration(now-sent))
		}
	}
	if start := atomic.LoadInt64(&r.win.start); start > 0 && sent >= start && sent < r.win.end {
		c.sentCount++
		if c.minSeq < 0 || seq < c.minSeq {
			c.minSeq = seq
		}
		if seq > c.maxSeq {
			c.maxSeq = seq
		}
	}
}

// controlConn is the connection that starts and stops the broadcasts. It is
// a client like the others to the server, so it gets them too; a goroutine
// reads them (a client that stopped reading would in the end be dropped, by
// some servers) and passes on the replies.
type controlConn struct {
	w       *wsClient
	timeout time.Duration
	replies chan []byte
}

func newControlConn(cfg *config, w *wsClient) *controlConn {
	c := &controlConn{w: w, timeout: cfg.ioTimeout, replies: make(chan []byte, 4)}
	go func() { // ends when the connection does
		defer close(c.replies)
		for {
			_, data, err := w.conn.ReadMessage()
			if err != nil {
				return
			}
			if _, _, isBroadcast := parseBroadcast(data); !isBroadcast {
				c.replies <- data
			}
		}
	}()
	return c
}

// call sends one request and waits for its reply, {"fanout":want}.
func (c *controlConn) call(route, params, want string) error {
	deadline := time.Now().Add(c.timeout)
	_ = c.w.conn.SetWriteDeadline(deadline)
	msg := `{"Route":"` + route + `","Params":` + params + `}`
	if err := c.w.conn.WriteMessage(websocket.TextMessage, []byte(msg)); err != nil {
		return err
	}
	timer := time.NewTimer(time.Until(deadline))
	defer timer.Stop()
	select {
	case data, ok := <-c.replies:
		if !ok {
			return fmt.Errorf("%s: the connection ended", route)
		}
		var obj map[string]interface{}
		if json.Unmarshal(data, &obj) != nil || obj["fanout"] != want {
			return fmt.Errorf("%s: unexpected reply %q", route, truncate(data))
		}
		return nil
	case <-timer.C:
		return fmt.Errorf("%s: no reply before the deadline", route)
	}
}

// close sends a Close frame and waits for the reader goroutine to see the
// server's (counted as a clean close without waiting for TCP's).
func (c *controlConn) close(errs *errorCounter, res *result) {
	msg := websocket.FormatCloseMessage(websocket.CloseNormalClosure, "")
	_ = c.w.conn.WriteControl(websocket.CloseMessage, msg, time.Now().Add(c.timeout))
	timer := time.NewTimer(c.timeout)
	defer timer.Stop()
	for {
		select {
		case _, ok := <-c.replies:
			if ok {
				continue
			}
			res.CloseClean++
		case <-timer.C:
			errs.add("close_read", errors.New("control connection: no close before the deadline"))
		}
		c.w.abort()
		return
	}
}

// dialFanout opens cfg.conns clients as dialAll does (at most
// -dial-concurrency handshakes in flight) and hands each to a reader as soon
// as its handshake is done.
func dialFanout(cfg *config, errs *errorCounter, readers *fanoutReaders) []*fanConn {
	fcs := make([]*fanConn, cfg.conns)
	dialEach(cfg, errs, func(i int, c client) {
		fc, err := readers.add(i%len(readers.epfds), c.(*wsClient))
		if err != nil {
			errs.add("epoll", err)
			c.abort()
			return
		}
		fcs[i] = fc
	})
	out := fcs[:0]
	for _, fc := range fcs {
		if fc != nil {
			out = append(out, fc)
		}
	}
	return out
}

func runFanout(cfg *config, errs *errorCounter, res *result) {
	if cfg.proto != "ws" {
		fmt.Fprintln(os.Stderr, "loadgen: -mode fanout needs -proto ws")
		os.Exit(2)
	}
	win := &fanoutWindow{}
	readers, err := newFanoutReaders(cfg, errs, win, runtime.GOMAXPROCS(0))
	if err != nil {
		errs.add("epoll", err)
		return
	}
	defer readers.closeEpoll()
	// The readers run while the clients connect: each client is read from the
	// moment its handshake is done, as a real one would be, so the server's
	// keepalive pings are answered however long connecting takes.
	readers.run()
	defer func() {
		atomic.StoreInt32(&readers.stop, 1)
		readers.wg.Wait()
	}()
	fcs := dialFanout(cfg, errs, readers)
	res.Held = int64(len(fcs))
	c, err := dial(cfg)
	if err != nil {
		errs.add("connect", err)
		return
	}
	ctl := newControlConn(cfg, c.(*wsClient))

	params := fmt.Sprintf(`{"interval_ms":%d,"size":%d}`,
		cfg.fanoutInterval.Milliseconds(), cfg.fanoutSize)
	if err := ctl.call("fanout_start", params, "started"); err != nil {
		errs.add("fanout_start", err)
	} else {
		time.Sleep(cfg.warmup)
		cpu0 := cpuSeconds()
		t0 := time.Now()
		win.end = t0.UnixNano() + int64(cfg.duration)
		atomic.StoreInt64(&win.start, t0.UnixNano())
		emit("EVENT window_start")
		time.Sleep(time.Until(time.Unix(0, win.end)))
		res.WindowSec = cfg.duration.Seconds() // the window is judged by timestamps
		res.CPUSec = cpuSeconds() - cpu0
		emit("EVENT window_end")
		if err := ctl.call("fanout_stop", "null", "stopped"); err != nil {
			errs.add("fanout_stop", err)
		}
	}
	// Close every client, at most -dial-concurrency close handshakes in
	// flight, as closeAll does; the readers see each one through.
	atomic.StoreInt32(&win.closing, 1)
	// A client's Close frame, code 1000: masked (all-zero key, which RFC 6455
	// allows; nothing here needs it unpredictable).
	msg := []byte{0x88, 0x82, 0, 0, 0, 0, 0x03, 0xe8}
	sem := make(chan struct{}, cfg.dialConcurrency)
	var cw sync.WaitGroup
	for _, fc := range fcs {
		sem <- struct{}{}
		cw.Add(1)
		go func(fc *fanConn) {
			defer cw.Done()
			defer func() { <-sem }()
			// The deadline is stored before the state, so a reader that sees
			// state 1 sees the deadline too; under wmu, so no Pong follows.
			fc.wmu.Lock()
			atomic.StoreInt64(&fc.deadline, time.Now().Add(cfg.ioTimeout).UnixNano())
			atomic.StoreInt32(&fc.closeState, 1)
			_, err := syscall.Write(fc.fd, msg) // 8 bytes into an idle socket: never EAGAIN
			fc.wmu.Unlock()
			if err != nil && !fc.isFinished() {
				errs.add("close_write", err)
			}
			select {
			case <-fc.done:
			case <-time.After(cfg.ioTimeout + cfg.closeWait + time.Second):
				// Only if a reader died: its own deadlines end every handshake.
				errs.add("close_timeout", errors.New("close handshake never finished"))
			}
			_ = syscall.Close(fc.fd) // the reader has let it go (or died)
		}(fc)
	}
	cw.Wait()
	ctl.close(errs, res)

	var all latencies
	minSeq, maxSeq := int64(-1), int64(-1)
	var sent int64
	for _, fc := range fcs {
		res.Count += fc.count
		res.Missed += fc.missed
		sent += fc.sentCount
		all = append(all, fc.samples...)
		if fc.minSeq >= 0 && (minSeq < 0 || fc.minSeq < minSeq) {
			minSeq = fc.minSeq
		}
		if fc.maxSeq > maxSeq {
			maxSeq = fc.maxSeq
		}
		switch fc.outcome {
		case "clean":
			res.CloseClean++
		case "unclean":
			res.CloseUnclean++
		case "slow":
			res.CloseSlow++
		}
	}
	if minSeq >= 0 {
		res.Ticks = maxSeq - minSeq + 1
		res.Expected = res.Ticks * res.Held
		res.SentDelivered = sent
		res.TickRate = float64(res.Ticks) / cfg.duration.Seconds()
	}
	fillLatency(res, all)
}

// dialAll opens cfg.conns connections with at most cfg.dialConcurrency
// handshakes in flight, so a slow accept loop sees a queue, not a SYN flood.
// held: start each connection's reader as soon as it is open, since the
// first ones may wait a long time for the rest.
func dialAll(cfg *config, errs *errorCounter, held bool) []client {
	clients := make([]client, cfg.conns)
	dialEach(cfg, errs, func(i int, c client) {
		if held {
			c.startReader()
		}
		clients[i] = c
	})
	return clients
}

// dialEach opens cfg.conns connections, at most -dial-concurrency handshakes in
// flight, and calls opened(i, c) for each one that opened (from its dialing
// goroutine, so opened must only touch slot i of shared state); failures are
// counted as "connect" errors. It returns once every dial has ended.
func dialEach(cfg *config, errs *errorCounter, opened func(i int, c client)) {
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
			opened(i, c)
		}(i)
	}
	wg.Wait()
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
	flag.StringVar(&cfg.mode, "mode", "closed", "closed, churn, hold or fanout")
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
	flag.IntVar(&cfg.sourceAddrs, "source-addrs", 1, "spread connections over 127.0.0.1 .. 127.0.0.N")
	flag.DurationVar(&cfg.fanoutInterval, "fanout-interval", 20*time.Millisecond, "fanout mode: broadcast period asked of the server")
	flag.IntVar(&cfg.fanoutSize, "fanout-size", 64, "fanout mode: broadcast message size in bytes asked of the server")
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
	if cfg.sourceAddrs < 1 || cfg.sourceAddrs > 250 || cfg.fanoutInterval < time.Millisecond || cfg.fanoutSize < 48 {
		fmt.Fprintln(os.Stderr, "loadgen: -source-addrs 1..250, -fanout-interval >= 1ms, -fanout-size >= 48")
		os.Exit(2)
	}
	raiseFdLimit()

	errs := &errorCounter{counts: map[string]int64{}, limit: cfg.maxErrorLogs}
	res := &result{Mode: cfg.mode, Proto: cfg.proto, Conns: cfg.conns, Payload: cfg.payload}
	switch cfg.mode {
	case "closed":
		runClosed(cfg, errs, res)
	case "churn":
		runChurn(cfg, errs, res)
	case "hold":
		runHold(cfg, errs, res)
	case "fanout":
		runFanout(cfg, errs, res)
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
