// Command sonde-grpc-go is the Go gRPC (google.golang.org/grpc) server and client of
// sonde's integration tests (tests/test_http2.py): real gRPC over HTTP/2 over Go
// crypto/tls, without generated code. The service is written by hand (a
// grpc.ServiceDesc) and its messages are raw bytes (a codec named "raw", forced on both
// sides, so the content-type is application/grpc+raw), like tests/grpc/orders.py:
//
//	serve -cert C -key K          server on 127.0.0.1:0 over TLS, prints "PORT n" once
//	                              listening
//	call -ca C -port N ID...      one unary call per id on one connection (TLS, C as
//	                              the CA, server name localhost); prints
//	                              {"id": "OK" | code name, ...}
//
// The method /sonde.test.Orders/Get takes an order id and answers
// {"order_id":ID,"status":"created"}, or NOT_FOUND for the id "missing".
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"os"
	"strconv"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
)

const method = "/sonde.test.Orders/Get"

// rawCodec sends and receives messages as they are: *[]byte or []byte.
type rawCodec struct{}

func (rawCodec) Name() string { return "raw" }

func (rawCodec) Marshal(v any) ([]byte, error) {
	switch m := v.(type) {
	case []byte:
		return m, nil
	case *[]byte:
		return *m, nil
	}
	return nil, fmt.Errorf("raw codec: cannot marshal %T", v)
}

func (rawCodec) Unmarshal(data []byte, v any) error {
	m, ok := v.(*[]byte)
	if !ok {
		return fmt.Errorf("raw codec: cannot unmarshal into %T", v)
	}
	*m = append([]byte(nil), data...)
	return nil
}

// ordersServer is the service's handler type, as protoc-gen-go-grpc would write it.
type ordersServer interface {
	Get(context.Context, []byte) ([]byte, error)
}

type orders struct{}

func (orders) Get(_ context.Context, id []byte) ([]byte, error) {
	if string(id) == "missing" {
		return nil, status.Error(codes.NotFound, "no such order")
	}
	return []byte(`{"order_id":"` + string(id) + `","status":"created"}`), nil
}

func getHandler(srv any, ctx context.Context, dec func(any) error, icpt grpc.UnaryServerInterceptor) (any, error) {
	var in []byte
	if err := dec(&in); err != nil {
		return nil, err
	}
	if icpt == nil {
		return srv.(ordersServer).Get(ctx, in)
	}
	info := &grpc.UnaryServerInfo{Server: srv, FullMethod: method}
	return icpt(ctx, in, info, func(ctx context.Context, req any) (any, error) {
		return srv.(ordersServer).Get(ctx, req.([]byte))
	})
}

var ordersDesc = grpc.ServiceDesc{
	ServiceName: "sonde.test.Orders",
	HandlerType: (*ordersServer)(nil),
	Methods:     []grpc.MethodDesc{{MethodName: "Get", Handler: getHandler}},
	Streams:     []grpc.StreamDesc{},
	Metadata:    "orders.proto",
}

func main() {
	if len(os.Args) < 2 {
		fail("usage: sonde-grpc-go serve|call ...")
	}
	args := os.Args[2:]
	switch os.Args[1] {
	case "serve":
		serve(args)
	case "call":
		call(args)
	default:
		fail("unknown subcommand " + os.Args[1])
	}
}

func serve(args []string) {
	fs := flag.NewFlagSet("serve", flag.ExitOnError)
	cert := fs.String("cert", "", "certificate (PEM)")
	key := fs.String("key", "", "private key (PEM)")
	_ = fs.Parse(args)
	creds, err := credentials.NewServerTLSFromFile(*cert, *key)
	if err != nil {
		fail("server credentials: " + err.Error())
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fail("listen: " + err.Error())
	}
	s := grpc.NewServer(grpc.Creds(creds), grpc.ForceServerCodec(rawCodec{}))
	s.RegisterService(&ordersDesc, orders{})
	fmt.Printf("PORT %d\n", ln.Addr().(*net.TCPAddr).Port)
	if err := s.Serve(ln); err != nil {
		fail("serve: " + err.Error())
	}
}

func call(args []string) {
	fs := flag.NewFlagSet("call", flag.ExitOnError)
	ca := fs.String("ca", "", "CA certificate (PEM)")
	port := fs.Int("port", 0, "server port on 127.0.0.1")
	_ = fs.Parse(args)
	creds, err := credentials.NewClientTLSFromFile(*ca, "localhost")
	if err != nil {
		fail("client credentials: " + err.Error())
	}
	conn, err := grpc.NewClient("passthrough:///127.0.0.1:"+strconv.Itoa(*port),
		grpc.WithTransportCredentials(creds),
		grpc.WithDefaultCallOptions(grpc.ForceCodec(rawCodec{})))
	if err != nil {
		fail("client: " + err.Error())
	}
	defer conn.Close()
	out := map[string]string{}
	for _, id := range fs.Args() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		var reply []byte
		err := conn.Invoke(ctx, method, []byte(id), &reply)
		cancel()
		switch {
		case err == nil:
			out[id] = "OK"
		default:
			st, ok := status.FromError(err)
			if !ok || st.Code() == codes.Unknown || st.Code() == codes.Unavailable {
				fail(fmt.Sprintf("call %s: %v", id, err))
			}
			out[id] = st.Code().String()
		}
	}
	b, _ := json.Marshal(out)
	fmt.Println(string(b))
}

func fail(msg string) {
	fmt.Fprintln(os.Stderr, "sonde-grpc-go:", msg)
	os.Exit(1)
}
