// Command gorilla is the benchmark's Go peer: gorilla/websocket (Debian's
// golang-github-gorilla-websocket-dev) doing the same JSON work as the Python
// peers and as the Go seed did: decode the {"Route":..,"Params":..} envelope,
// look the route up in a map guarded by an RWMutex, encode the handler's
// result, and reply in the request's frame type.
//
// Like every server bench.py starts, it takes --port (0 = pick one), listens
// on 127.0.0.1 only and prints "READY port=N" once it accepts connections.
// It is built by bench.py (GOPATH mode against /usr/share/gocode, nothing
// downloaded), like the load generator.
//
// Connections follow the hub pattern of gorilla's chat example
// (examples/chat: hub.go, client.go): one hub goroutine owns the set of
// clients; each client has a read goroutine and a write goroutine draining a
// buffered send channel; a broadcast is a non-blocking send on every client's
// channel, and a client whose channel is full is dropped. Two departures,
// both so that the request/reply scenarios measure gorilla at its best:
// replies are written by the read goroutine itself (under a per-connection
// mutex shared with the write goroutine, since gorilla allows one writer at a
// time) instead of taking a hop through the channel, and the write goroutine
// sends one frame per message instead of joining queued messages with
// newlines into one frame (which would change what the client receives).
// No keepalive pings, as no other peer pings.
//
// Fan-out: the routes "fanout_start" (Params {"interval_ms":20,"size":64})
// and "fanout_stop" start and stop a ticker goroutine that hands the hub one
// message per tick (benchmarks/README.md, "Fan-out").
package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/gorilla/websocket"
)

// backlog is the listen backlog every peer bench.py configures uses.
const backlog = 1024

// sendBuffer is the chat example's per-client send channel size.
const sendBuffer = 256

// ---------------------------------------------------------------- routing

type envelope struct {
	Route  string          `json:"Route"`
	Params json.RawMessage `json:"Params"`
}

// handler gets Params as the client wrote them (json.RawMessage, as the Go
// seed's handlers did) and returns a value to encode as the reply.
type handler func(params json.RawMessage) (interface{}, error)

type router struct {
	mu     sync.RWMutex
	routes map[string]handler
}

func (r *router) register(name string, h handler) {
	r.mu.Lock()
	r.routes[name] = h
	r.mu.Unlock()
}

func (r *router) lookup(name string) (handler, bool) {
	r.mu.RLock()
	h, ok := r.routes[name]
	r.mu.RUnlock()
	return h, ok
}

type errorReply struct {
	Error string `json:"error"`
}

// dispatch routes one request and returns the encoded reply. A bad envelope
// or unknown route gets an error object, as the Python peers' dispatch does.
func (r *router) dispatch(raw []byte) []byte {
	var env envelope
	if err := json.Unmarshal(raw, &env); err != nil {
		return mustMarshal(errorReply{"bad envelope: " + err.Error()})
	}
	h, ok := r.lookup(env.Route)
	if !ok {
		return mustMarshal(errorReply{"unknown route: " + env.Route})
	}
	result, err := h(env.Params)
	if err != nil {
		return mustMarshal(errorReply{err.Error()})
	}
	out, err := json.Marshal(result)
	if err != nil {
		return mustMarshal(errorReply{"bad result: " + err.Error()})
	}
	return out
}

func mustMarshal(v interface{}) []byte {
	out, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	return out
}

// ---------------------------------------------------------------- hub (chat example)

type client struct {
	hub  *hub
	conn *websocket.Conn
	send chan []byte
	wmu  sync.Mutex // gorilla allows one concurrent writer: replies and broadcasts take turns
	// dropped is set by the hub before it closes send because the client fell
	// behind (not because it left); the close of send orders it for writePump.
	dropped bool
}

type hub struct {
	clients    map[*client]bool
	broadcast  chan []byte
	register   chan *client
	unregister chan *client
}

func newHub() *hub {
	return &hub{
		clients:    make(map[*client]bool),
		broadcast:  make(chan []byte),
		register:   make(chan *client),
		unregister: make(chan *client),
	}
}

func (h *hub) run() {
	for {
		select {
		case c := <-h.register:
			h.clients[c] = true
		case c := <-h.unregister:
			if _, ok := h.clients[c]; ok {
				delete(h.clients, c)
				close(c.send)
			}
		case message := <-h.broadcast:
			for c := range h.clients {
				select {
				case c.send <- message:
				default: // the chat example's policy: a client that can't keep up is dropped
					c.dropped = true
					close(c.send)
					delete(h.clients, c)
				}
			}
		}
	}
}

// readPump answers requests until the connection ends. Close frames are
// answered by gorilla's default close handler, after which ReadMessage fails
// and the deferred Close closes TCP (server first, as RFC 6455 7.1.1 asks).
func (c *client) readPump(r *router) {
	defer func() {
		c.hub.unregister <- c
		c.conn.Close()
	}()
	for {
		mt, data, err := c.conn.ReadMessage()
		if err != nil {
			return
		}
		reply := r.dispatch(data)
		c.wmu.Lock()
		err = c.conn.WriteMessage(mt, reply) // the request's frame type
		c.wmu.Unlock()
		if err != nil {
			return
		}
	}
}

// writePump sends what the hub queued, one frame per message.
func (c *client) writePump() {
	defer c.conn.Close()
	for message := range c.send {
		c.wmu.Lock()
		err := c.conn.WriteMessage(websocket.TextMessage, message)
		c.wmu.Unlock()
		if err != nil {
			return
		}
	}
	if !c.dropped {
		return // the client left; readPump has closed or is closing the connection
	}
	_ = c.conn.WriteControl(websocket.CloseMessage,
		websocket.FormatCloseMessage(websocket.CloseGoingAway, "too slow"),
		time.Now().Add(time.Second))
}

// ---------------------------------------------------------------- fan-out ticker

type fanout struct {
	hub  *hub
	mu   sync.Mutex
	stop chan struct{}
	seq  int64
}

type fanoutParams struct {
	IntervalMs int `json:"interval_ms"`
	Size       int `json:"size"`
}

// message is the broadcast payload: {"seq":N,"t":<unix ns>,"pad":"xx.."}
// padded to size bytes; t is the wall clock when the tick fired, so the
// client's receive time minus t is the delivery latency (same host).
func broadcastMessage(seq int64, size int) []byte {
	b := make([]byte, 0, size)
	b = append(b, `{"seq":`...)
	b = strconv.AppendInt(b, seq, 10)
	b = append(b, `,"t":`...)
	b = strconv.AppendInt(b, time.Now().UnixNano(), 10)
	b = append(b, `,"pad":"`...)
	for len(b) < size-2 {
		b = append(b, 'x')
	}
	return append(b, `"}`...)
}

func (f *fanout) start(raw json.RawMessage) (interface{}, error) {
	p := fanoutParams{IntervalMs: 20, Size: 64}
	if len(raw) > 0 && string(raw) != "null" {
		if err := json.Unmarshal(raw, &p); err != nil {
			return nil, err
		}
	}
	if p.IntervalMs < 1 || p.Size < 48 {
		return nil, errors.New("fanout_start: interval_ms >= 1 and size >= 48 required")
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.stop == nil {
		f.stop = make(chan struct{})
		go f.tick(time.Duration(p.IntervalMs)*time.Millisecond, p.Size, f.stop)
	}
	return map[string]string{"fanout": "started"}, nil
}

func (f *fanout) end(json.RawMessage) (interface{}, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.stop != nil {
		close(f.stop)
		f.stop = nil
	}
	return map[string]string{"fanout": "stopped"}, nil
}

// tick hands the hub one message per interval. time.Ticker drops ticks a
// slow receiver misses rather than bunching them up.
func (f *fanout) tick(interval time.Duration, size int, stop chan struct{}) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case <-t.C:
			msg := broadcastMessage(atomic.AddInt64(&f.seq, 1)-1, size)
			select {
			case f.hub.broadcast <- msg:
			case <-stop:
				return
			}
		}
	}
}

// ---------------------------------------------------------------- process

// prepareProcess does what _common.prepare_process does for the Python peers:
// soft RLIMIT_NOFILE up to the hard limit (10,000 sockets need it), and die
// with bench.py (PR_SET_PDEATHSIG) so no orphan keeps listening.
func prepareProcess() {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err == nil && lim.Cur < lim.Max {
		lim.Cur = lim.Max
		_ = syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim)
	}
	_, _, _ = syscall.RawSyscall(syscall.SYS_PRCTL, syscall.PR_SET_PDEATHSIG, uintptr(syscall.SIGKILL), 0)
}

func main() {
	port := flag.Int("port", 0, "TCP port on 127.0.0.1 (0 = pick a free one)")
	maxConns := flag.Int64("max-connections", 20000, "open connections at once; one more gets HTTP 503")
	flag.Parse()
	prepareProcess()

	ln, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(*port)))
	if err != nil {
		fmt.Fprintln(os.Stderr, "gorilla:", err)
		os.Exit(1)
	}
	// Go listens with the kernel's somaxconn; the other peers use 1,024.
	// Linux lets listen() be called again to change the backlog.
	if raw, err := ln.(*net.TCPListener).SyscallConn(); err == nil {
		_ = raw.Control(func(fd uintptr) { _ = syscall.Listen(int(fd), backlog) })
	}

	h := newHub()
	go h.run()
	r := &router{routes: map[string]handler{}}
	r.register("echo", func(params json.RawMessage) (interface{}, error) { return params, nil })
	f := &fanout{hub: h}
	r.register("fanout_start", f.start)
	r.register("fanout_stop", f.end)

	upgrader := websocket.Upgrader{
		ReadBufferSize:    4096,
		WriteBufferSize:   4096,
		EnableCompression: false,
		// Any origin, as the Go seed allowed; the load generator sends none.
		CheckOrigin: func(*http.Request) bool { return true },
	}
	var active int64
	serveWS := func(w http.ResponseWriter, req *http.Request) {
		// Admission before the upgrade, as the Go seed and wsroute_sync do.
		if atomic.AddInt64(&active, 1) > *maxConns {
			atomic.AddInt64(&active, -1)
			w.Header().Set("Retry-After", "1")
			http.Error(w, "Too many connections", http.StatusServiceUnavailable)
			return
		}
		conn, err := upgrader.Upgrade(w, req, nil)
		if err != nil {
			atomic.AddInt64(&active, -1)
			return // Upgrade has already answered with an HTTP error
		}
		c := &client{hub: h, conn: conn, send: make(chan []byte, sendBuffer)}
		h.register <- c
		go c.writePump()
		c.readPump(r)
		atomic.AddInt64(&active, -1)
	}

	srv := &http.Server{Handler: http.HandlerFunc(serveWS)}
	fmt.Printf("READY port=%d\n", ln.Addr().(*net.TCPAddr).Port)
	if err := srv.Serve(ln); err != nil {
		fmt.Fprintln(os.Stderr, "gorilla:", err)
		os.Exit(1)
	}
}
