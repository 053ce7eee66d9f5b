// Command sonde-go-clients holds the Go programs of sonde's integration tests, one
// per subcommand, so the agent sees real Go crypto/tls and amqp091-go traffic:
//
//	tls-server -cert C -key K                 HTTPS server (HTTP/1.1 only) on 127.0.0.1:0,
//	                                          prints "PORT n" once listening
//	tls-client -ca C -base URL REQ...         HTTPS client, one keep-alive connection;
//	                                          REQ is GET:/path or POST:/path:SIZE
//	h2-server -cert C -key K | -h2c           HTTP server with Go's defaults: HTTP/2 over TLS
//	                                          (ALPN), or h2c (prior knowledge) in plaintext;
//	h2-server -h2c-upgrade                    h2c by HTTP/1.1 Upgrade too (x/net/http2/h2c)
//	shop -down PREFIX [-spawn]                order service for the goroutine tests: GET
//	                                          /orders/{id} calls PREFIX{id}, see shop
//	h2-client -ca C -base URL -n N            HTTP/2 client with Go's defaults: one request,
//	                                          then N concurrent ones on the same connection
//	amqp-consume -url U -exchange E -type T -queue Q:KEY... -count N -ack manual|auto
//	amqp-publish -url U -exchange E -type T -rk K -count N -size B -confirm -id PREFIX
//
// The server's routes: GET /orders/{id} (JSON), GET /big?size=N (N bytes), POST
// /upload (answers {"received":N}), GET /missing (404), GET /boom (500).
// Clients print one JSON object on stdout when done.
package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/h2c"
)

func main() {
	if len(os.Args) < 2 {
		fail("usage: sonde-go-clients tls-server|tls-client|amqp-publish|amqp-consume ...")
	}
	args := os.Args[2:]
	switch os.Args[1] {
	case "tls-server":
		tlsServer(args)
	case "tls-client":
		tlsClient(args)
	case "h2-server":
		h2Server(args)
	case "h2-client":
		h2Client(args)
	case "shop":
		shop(args)
	case "amqp-publish":
		amqpPublish(args)
	case "amqp-consume":
		amqpConsume(args)
	default:
		fail("unknown subcommand " + os.Args[1])
	}
}

func fail(msg string) {
	fmt.Fprintln(os.Stderr, msg)
	os.Exit(2)
}

func check(err error, what string) {
	if err != nil {
		fail(what + ": " + err.Error())
	}
}

func printJSON(v any) {
	b, err := json.Marshal(v)
	check(err, "json")
	os.Stdout.Write(append(b, '\n'))
}

// ---------------------------------------------------------------- goroutines

// shop is the Go order service of tests/test_go_goroutines.py (as tests/services/
// JavaShop.java is the Java one). GET /orders/{id}: the first 8 requests wait for each
// other (at most 5 s), so that all 8 are in flight together when their calls are
// made; later ones do not wait. Then GET PREFIX{id} with http.DefaultClient (whose
// transport writes each request from its connection's writeLoop goroutine), from the
// handler's goroutine or, with -spawn, from a goroutine the handler starts and waits
// for; and answers 200 {"order_id": id, "status": "accepted"} (502 when the downstream
// did not answer 200). Listens on 127.0.0.1:0, prints "PORT n".
func shop(args []string) {
	fs := flag.NewFlagSet("shop", flag.ExitOnError)
	down := fs.String("down", "", "downstream URL prefix, e.g. http://127.0.0.1:8081/stock/")
	spawn := fs.Bool("spawn", false, "make the call from a goroutine the handler starts")
	fs.Parse(args)

	const together = 8
	var mu sync.Mutex
	arrived := 0
	allIn := make(chan struct{})
	call := func(id string) error {
		resp, err := http.Get(*down + id)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		io.Copy(io.Discard, resp.Body)
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("downstream answered %d", resp.StatusCode)
		}
		return nil
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /orders/{id}", func(w http.ResponseWriter, r *http.Request) {
		id := r.PathValue("id")
		mu.Lock()
		arrived++
		first := arrived <= together
		if arrived == together {
			close(allIn)
		}
		mu.Unlock()
		if first {
			select {
			case <-allIn:
			case <-time.After(5 * time.Second):
			}
		}
		var err error
		if *spawn {
			done := make(chan error, 1)
			go func() { done <- call(id) }()
			err = <-done
		} else {
			err = call(id)
		}
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadGateway)
			return
		}
		body := []byte(fmt.Sprintf(`{"order_id": %q, "status": "accepted"}`, id))
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		w.Write(body)
	})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	check(err, "listen")
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 30 * time.Second}
	fmt.Printf("PORT %d\n", ln.Addr().(*net.TCPAddr).Port)
	os.Stdout.Sync()
	check(srv.Serve(ln), "serve")
}

// ---------------------------------------------------------------- HTTPS

// noH2Server turns HTTP/2 off: the HTTPS tests that use it are about HTTP/1.1 (h2-server
// has Go's defaults).
func noH2Server() map[string]func(*http.Server, *tls.Conn, http.Handler) {
	return map[string]func(*http.Server, *tls.Conn, http.Handler){}
}

func tlsServer(args []string) {
	fs := flag.NewFlagSet("tls-server", flag.ExitOnError)
	cert := fs.String("cert", "", "certificate (PEM)")
	key := fs.String("key", "", "private key (PEM)")
	fs.Parse(args)

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	check(err, "listen")
	srv := &http.Server{Handler: routes(), TLSNextProto: noH2Server(), ReadHeaderTimeout: 30 * time.Second}
	fmt.Printf("PORT %d\n", ln.Addr().(*net.TCPAddr).Port)
	os.Stdout.Sync()
	check(srv.ServeTLS(ln, *cert, *key), "serve")
}

// h2Server serves the same routes with Go's defaults: over TLS that is HTTP/2 for any
// client that offers it; with -h2c, plaintext HTTP/2 with prior knowledge (and HTTP/1.1).
func h2Server(args []string) {
	fs := flag.NewFlagSet("h2-server", flag.ExitOnError)
	cert := fs.String("cert", "", "certificate (PEM)")
	key := fs.String("key", "", "private key (PEM)")
	prior := fs.Bool("h2c", false, "plaintext HTTP/2 (prior knowledge)")
	upgrade := fs.Bool("h2c-upgrade", false, "plaintext HTTP/2 by HTTP/1.1 Upgrade: h2c (and prior knowledge)")
	fs.Parse(args)

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	check(err, "listen")
	srv := &http.Server{Handler: routes(), ReadHeaderTimeout: 30 * time.Second}
	fmt.Printf("PORT %d\n", ln.Addr().(*net.TCPAddr).Port)
	os.Stdout.Sync()
	if *upgrade {
		// net/http's own h2c is prior knowledge only; x/net's h2c handler also answers
		// an HTTP/1.1 request that asks to upgrade with a 101, then serves HTTP/2.
		srv.Handler = h2c.NewHandler(routes(), &http2.Server{})
		check(srv.Serve(ln), "serve")
	}
	if *prior {
		var p http.Protocols
		p.SetHTTP1(true)
		p.SetUnencryptedHTTP2(true)
		srv.Protocols = &p
		check(srv.Serve(ln), "serve")
	}
	check(srv.ServeTLS(ln, *cert, *key), "serve")
}

// h2Client sends one request (the connection is made), then n concurrent ones, which
// Go multiplexes on that connection as HTTP/2 streams.
func h2Client(args []string) {
	fs := flag.NewFlagSet("h2-client", flag.ExitOnError)
	ca := fs.String("ca", "", "CA certificate (PEM)")
	base := fs.String("base", "", "https://127.0.0.1:PORT")
	n := fs.Int("n", 8, "concurrent requests after the first")
	fs.Parse(args)

	pem, err := os.ReadFile(*ca)
	check(err, "read CA")
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		fail("no certificate in " + *ca)
	}
	// A TLS config of our own turns HTTP/2 off unless asked for: ask, as
	// http.DefaultTransport does.
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}, ForceAttemptHTTP2: true}
	client := &http.Client{Transport: tr, Timeout: 60 * time.Second}

	type result struct {
		Path   string `json:"path"`
		Status int    `json:"status"`
		Proto  string `json:"proto"`
		Reused bool   `json:"reused"`
	}
	get := func(path string) result {
		reused := false
		trace := &httptrace.ClientTrace{GotConn: func(i httptrace.GotConnInfo) { reused = i.Reused }}
		req, err := http.NewRequestWithContext(httptrace.WithClientTrace(context.Background(), trace),
			"GET", *base+path, nil)
		check(err, "request")
		req.Header.Set("User-Agent", "sonde-test-go-h2/1.0")
		resp, err := client.Do(req)
		check(err, path)
		_, err = io.ReadAll(resp.Body)
		check(err, "read body")
		resp.Body.Close()
		return result{path, resp.StatusCode, resp.Proto, reused}
	}
	out := []result{get("/orders/100")}
	results := make(chan result, *n)
	for i := 1; i <= *n; i++ {
		path := fmt.Sprintf("/orders/%d", 100+i)
		if i == *n {
			path = "/missing"
		}
		go func() { results <- get(path) }()
	}
	for i := 0; i < *n; i++ {
		out = append(out, <-results)
	}
	tr.CloseIdleConnections()
	printJSON(map[string]any{"responses": out})
}

func routes() *http.ServeMux {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /orders/{id}", func(w http.ResponseWriter, r *http.Request) {
		body := []byte(fmt.Sprintf(`{"order_id":%q,"status":"created"}`, r.PathValue("id")))
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		w.Write(body)
	})
	mux.HandleFunc("GET /big", func(w http.ResponseWriter, r *http.Request) {
		n, err := strconv.Atoi(r.URL.Query().Get("size"))
		if err != nil || n < 0 {
			http.Error(w, "bad size", http.StatusBadRequest)
			return
		}
		w.Header().Set("Content-Type", "application/octet-stream")
		w.Header().Set("Content-Length", strconv.Itoa(n))
		w.Write(bytes.Repeat([]byte{'b'}, n))
	})
	mux.HandleFunc("POST /upload", func(w http.ResponseWriter, r *http.Request) {
		n, err := io.Copy(io.Discard, r.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		body := []byte(fmt.Sprintf(`{"received":%d}`, n))
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		w.Write(body)
	})
	mux.HandleFunc("GET /missing", func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "not found", http.StatusNotFound)
	})
	mux.HandleFunc("GET /boom", func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "boom", http.StatusInternalServerError)
	})
	return mux
}

func tlsClient(args []string) {
	fs := flag.NewFlagSet("tls-client", flag.ExitOnError)
	ca := fs.String("ca", "", "CA certificate (PEM)")
	base := fs.String("base", "", "https://127.0.0.1:PORT")
	fs.Parse(args)

	pem, err := os.ReadFile(*ca)
	check(err, "read CA")
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		fail("no certificate in " + *ca)
	}
	tr := &http.Transport{
		TLSClientConfig:     &tls.Config{RootCAs: pool},
		TLSNextProto:        map[string]func(string, *tls.Conn) http.RoundTripper{},
		ForceAttemptHTTP2:   false,
		MaxIdleConnsPerHost: 1,
		DisableCompression:  true,
	}
	client := &http.Client{Transport: tr, Timeout: 120 * time.Second}

	type result struct {
		Method string `json:"method"`
		Path   string `json:"path"`
		Status int    `json:"status"`
		Len    int    `json:"len"`
		Reused bool   `json:"reused"`
		Proto  string `json:"proto"`
	}
	var out []result
	conns := 0
	for _, spec := range fs.Args() {
		parts := strings.SplitN(spec, ":", 3)
		method, path := parts[0], parts[1]
		var body io.Reader
		var size int64
		if method == "POST" {
			n, err := strconv.Atoi(parts[2])
			check(err, "size")
			size = int64(n)
			body = bytes.NewReader(bytes.Repeat([]byte{'p'}, n))
		}
		req, err := http.NewRequest(method, *base+path, body)
		check(err, "request")
		req.Header.Set("User-Agent", "sonde-test-go/1.0")
		if body != nil {
			req.ContentLength = size
			req.Header.Set("Content-Type", "application/octet-stream")
		}
		reused := false
		trace := &httptrace.ClientTrace{GotConn: func(i httptrace.GotConnInfo) {
			reused = i.Reused
			if !i.Reused {
				conns++
			}
		}}
		req = req.WithContext(httptrace.WithClientTrace(context.Background(), trace))
		resp, err := client.Do(req)
		check(err, spec)
		b, err := io.ReadAll(resp.Body)
		check(err, "read body")
		resp.Body.Close()
		out = append(out, result{method, path, resp.StatusCode, len(b), reused, resp.Proto})
	}
	tr.CloseIdleConnections()
	printJSON(map[string]any{"responses": out, "connections": conns})
}

// ---------------------------------------------------------------- AMQP

type queueSpec struct{ name, key string }

type queueList []queueSpec

func (q *queueList) String() string { return fmt.Sprint(*q) }
func (q *queueList) Set(v string) error {
	name, key, _ := strings.Cut(v, ":")
	*q = append(*q, queueSpec{name, key})
	return nil
}

func amqpConsume(args []string) {
	fs := flag.NewFlagSet("amqp-consume", flag.ExitOnError)
	url := fs.String("url", "", "amqp://user:pass@host:port/")
	exchange := fs.String("exchange", "", "exchange to declare and bind to")
	kind := fs.String("type", "direct", "exchange type")
	var queues queueList
	fs.Var(&queues, "queue", "QUEUE:BINDING_KEY (repeatable)")
	count := fs.Int("count", 1, "deliveries to settle before exiting")
	ack := fs.String("ack", "manual", "manual or auto")
	fs.Parse(args)

	conn, err := amqp.Dial(*url)
	check(err, "dial")
	ch, err := conn.Channel()
	check(err, "channel")
	if *exchange != "" {
		check(ch.ExchangeDeclare(*exchange, *kind, false, false, false, false, nil), "exchange.declare")
	}
	type got struct {
		Queue       string `json:"queue"`
		RoutingKey  string `json:"routing_key"`
		Size        int    `json:"size"`
		Redelivered bool   `json:"redelivered"`
		Tag         uint64 `json:"delivery_tag"`
		MessageID   string `json:"message_id"`
	}
	deliveries := make(chan got, 1024)
	autoAck := *ack == "auto"
	for _, q := range queues {
		_, err := ch.QueueDeclare(q.name, false, false, false, false, nil)
		check(err, "queue.declare")
		if *exchange != "" {
			check(ch.QueueBind(q.name, q.key, *exchange, false, nil), "queue.bind")
		}
		msgs, err := ch.Consume(q.name, "", autoAck, false, false, false, nil)
		check(err, "basic.consume")
		go func(queue string, msgs <-chan amqp.Delivery) {
			for d := range msgs {
				if !autoAck {
					check(d.Ack(false), "basic.ack")
				}
				deliveries <- got{queue, d.RoutingKey, len(d.Body), d.Redelivered, d.DeliveryTag, d.MessageId}
			}
		}(q.name, msgs)
	}
	fmt.Println("READY")
	os.Stdout.Sync()
	var received []got
	timeout := time.After(60 * time.Second)
	for len(received) < *count {
		select {
		case d := <-deliveries:
			received = append(received, d)
		case <-timeout:
			fail(fmt.Sprintf("timed out with %d of %d deliveries", len(received), *count))
		}
	}
	check(ch.Close(), "channel.close")
	check(conn.Close(), "connection.close")
	printJSON(map[string]any{"received": received})
}

func amqpPublish(args []string) {
	fs := flag.NewFlagSet("amqp-publish", flag.ExitOnError)
	url := fs.String("url", "", "amqp://user:pass@host:port/")
	exchange := fs.String("exchange", "", "exchange")
	kind := fs.String("type", "direct", "exchange type (declared when -exchange is set)")
	rk := fs.String("rk", "", "routing key")
	count := fs.Int("count", 1, "messages")
	size := fs.Int("size", 64, "body size")
	confirm := fs.Bool("confirm", false, "publisher confirms")
	id := fs.String("id", "go", "message id prefix")
	fs.Parse(args)

	conn, err := amqp.Dial(*url)
	check(err, "dial")
	ch, err := conn.Channel()
	check(err, "channel")
	if *exchange != "" {
		check(ch.ExchangeDeclare(*exchange, *kind, false, false, false, false, nil), "exchange.declare")
	}
	if *confirm {
		check(ch.Confirm(false), "confirm.select")
	}
	acked := 0
	for i := 1; i <= *count; i++ {
		body := messageBody(i, *size)
		msg := amqp.Publishing{
			ContentType:   "application/json",
			MessageId:     fmt.Sprintf("%s-%d", *id, i),
			CorrelationId: fmt.Sprintf("order-%d", i),
			Body:          body,
		}
		if *confirm {
			dc, err := ch.PublishWithDeferredConfirmWithContext(context.Background(), *exchange, *rk, false, false, msg)
			check(err, "basic.publish")
			ok, err := dc.WaitContext(context.Background())
			check(err, "confirm")
			if ok {
				acked++
			}
		} else {
			check(ch.PublishWithContext(context.Background(), *exchange, *rk, false, false, msg), "basic.publish")
		}
	}
	check(ch.Close(), "channel.close")
	check(conn.Close(), "connection.close")
	printJSON(map[string]any{"published": *count, "acked": acked})
}

// messageBody is a JSON object of exactly size bytes (at least its minimum length).
func messageBody(i, size int) []byte {
	head := fmt.Sprintf(`{"order_id":%d,"pad":"`, i)
	tail := `"}`
	pad := size - len(head) - len(tail)
	if pad < 0 {
		pad = 0
	}
	return []byte(head + strings.Repeat("x", pad) + tail)
}
