// The demo's MES (manufacturing execution system): no tracing code.
//
// It consumes order.created messages one at a time (prefetch 1, manual ack), fetches
// the order's model from the S3 store, checks it with admesh, slices it with a real
// slicer run as a separate program, "prints" it, and reports each status to the CRM
// (HTTPS) and as an order.status message. A delivery is acked only when the order is
// finished (done or failed), so it is in flight for the whole of its processing: what
// the MES does meanwhile belongs to that order. One order at a time is also what lets
// a tracer tell its calls apart (Go's goroutines give no thread evidence).
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
	"log"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	amqp "github.com/rabbitmq/amqp091-go"
)

type order struct {
	OrderID  string `json:"order_id"`
	ModelKey string `json:"model_key"`
	Material string `json:"material"`
}

type mes struct {
	crm      string
	client   *http.Client
	store    *s3.Client
	bucket   string
	ch       *amqp.Channel
	exchange string
	admesh   string
	slicer   string
	work     string
	printFor time.Duration
}

func main() {
	amqpURL := flag.String("amqp", "amqp://guest:guest@127.0.0.1:5672/", "RabbitMQ URL")
	exchange := flag.String("exchange", "shop", "topic exchange of order events")
	queue := flag.String("queue", "mes.pla", "queue this MES line consumes")
	bind := flag.String("bind", "order.created.pla", "routing key bound to the queue")
	storeURL := flag.String("store", "http://127.0.0.1:7070", "S3 endpoint of the model store")
	bucket := flag.String("bucket", "models", "bucket of the models")
	crm := flag.String("crm", "https://127.0.0.1:8443", "CRM base URL")
	ca := flag.String("ca", "", "CA certificate (PEM) the CRM's certificate is signed by")
	admesh := flag.String("admesh", "admesh", "mesh checker")
	slicer := flag.String("slicer", "prusa-slicer", "slicer")
	work := flag.String("work", os.TempDir(), "working directory for models and G-code")
	printFor := flag.Duration("print-time", 300*time.Millisecond, "how long a print takes")
	flag.Parse()

	pool := x509.NewCertPool()
	if *ca != "" {
		pem, err := os.ReadFile(*ca)
		if err != nil {
			log.Fatalf("mes: reading CA %s: %v", *ca, err)
		}
		pool.AppendCertsFromPEM(pem)
	}
	// A custom TLSClientConfig keeps net/http on HTTP/1.1 (no ForceAttemptHTTP2): the
	// CRM is Node's https server, and sonde does not parse HTTP/2 yet.
	client := &http.Client{
		Timeout:   30 * time.Second,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}},
	}
	store := s3.New(s3.Options{
		BaseEndpoint: aws.String(*storeURL),
		Region:       "us-east-1",
		UsePathStyle: true,
		Credentials:  credentials.NewStaticCredentialsProvider(env("AWS_ACCESS_KEY_ID", "demo"), env("AWS_SECRET_ACCESS_KEY", "demodemo"), ""),
	})

	conn, err := amqp.Dial(*amqpURL)
	if err != nil {
		log.Fatalf("mes: connecting to RabbitMQ %s: %v", *amqpURL, err)
	}
	ch, err := conn.Channel()
	must(err, "channel")
	must(ch.ExchangeDeclare(*exchange, "topic", true, false, false, false, nil), "exchange")
	_, err = ch.QueueDeclare(*queue, true, false, false, false, nil)
	must(err, "queue")
	must(ch.QueueBind(*queue, *bind, *exchange, false, nil), "bind")
	must(ch.Qos(1, 0, false), "qos")
	deliveries, err := ch.Consume(*queue, "mes", false, false, false, false, nil)
	must(err, "consume")
	m := &mes{crm: *crm, client: client, store: store, bucket: *bucket, ch: ch, exchange: *exchange,
		admesh: *admesh, slicer: *slicer, work: *work, printFor: *printFor}
	fmt.Println("READY")
	for d := range deliveries {
		var o order
		if err := json.Unmarshal(d.Body, &o); err != nil || o.OrderID == "" {
			log.Printf("mes: dropping a message that is no order: %q", d.Body)
			_ = d.Reject(false)
			continue
		}
		m.process(o)
		_ = d.Ack(false)
	}
	log.Printf("mes: the broker closed the consumer")
}

// process takes one order from accepted to done, or to failed at the stage that broke.
func (m *mes) process(o order) {
	m.status(o, "accepted", "")
	dir := filepath.Join(m.work, o.OrderID)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		m.status(o, "failed", "fetch")
		return
	}
	defer os.RemoveAll(dir)
	model := filepath.Join(dir, "model.stl")
	if err := m.fetch(o.ModelKey, model); err != nil {
		log.Printf("mes: order %s: fetching %s: %v", o.OrderID, o.ModelKey, err)
		m.status(o, "failed", "fetch")
		return
	}
	if out, err := exec.Command(m.admesh, model).CombinedOutput(); err != nil {
		log.Printf("mes: order %s: the model does not check: %v\n%s", o.OrderID, err, tail(out))
		m.status(o, "failed", "check")
		return
	}
	m.status(o, "slicing", "")
	gcode := filepath.Join(dir, "model.gcode")
	if out, err := exec.Command(m.slicer, "--export-gcode", "-o", gcode, model).CombinedOutput(); err != nil {
		log.Printf("mes: order %s: slicing failed: %v\n%s", o.OrderID, err, tail(out))
		m.status(o, "failed", "slicing")
		return
	}
	m.status(o, "printing", "")
	time.Sleep(m.printFor)
	m.status(o, "done", "")
}

func (m *mes) fetch(key, to string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	obj, err := m.store.GetObject(ctx, &s3.GetObjectInput{Bucket: aws.String(m.bucket), Key: aws.String(key)})
	if err != nil {
		return err
	}
	defer obj.Body.Close()
	f, err := os.Create(to)
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = io.Copy(f, obj.Body)
	return err
}

// status tells the CRM (retrying a 5xx a few times) and publishes order.status.
func (m *mes) status(o order, status, stage string) {
	body, _ := json.Marshal(map[string]string{"order_id": o.OrderID, "status": status, "stage": stage})
	url := fmt.Sprintf("%s/orders/%s/status", m.crm, o.OrderID)
	for attempt := 1; attempt <= 3; attempt++ {
		resp, err := m.client.Post(url, "application/json", bytes.NewReader(body))
		if err == nil {
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode < 500 {
				break
			}
			err = fmt.Errorf("HTTP %d", resp.StatusCode)
		}
		log.Printf("mes: order %s: CRM status %s, attempt %d: %v", o.OrderID, status, attempt, err)
		time.Sleep(200 * time.Millisecond)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err := m.ch.PublishWithContext(ctx, m.exchange, "order.status", false, false,
		amqp.Publishing{ContentType: "application/json", Body: body})
	if err != nil {
		log.Printf("mes: order %s: publishing status %s: %v", o.OrderID, status, err)
	}
}

func tail(b []byte) []byte {
	if len(b) > 400 {
		return b[len(b)-400:]
	}
	return b
}

func env(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}

func must(err error, what string) {
	if err != nil {
		log.Fatalf("mes: %s: %v", what, err)
	}
}
