// mockoidc runs github.com/oauth2-proxy/mockoidc, a mock OpenID Connect provider, as a
// process for tests/test_jaeger_access.py: it stands in for the company's OIDC
// provider in front of which oauth2-proxy guards Jaeger's query service.
//
//	mockoidc ADDR CONTROL_ADDR
//
// prints one JSON line {"issuer","client_id","client_secret"} once it listens on ADDR.
// POST http://CONTROL_ADDR/user?email=E&groups=a,b queues the user the next login
// signs in as (without one queued: mockoidc's default user, of groups engineering and
// design).
package main

import (
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"strings"

	"github.com/oauth2-proxy/mockoidc"
)

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: mockoidc ADDR CONTROL_ADDR")
		os.Exit(2)
	}
	m, err := mockoidc.NewServer(nil)
	if err != nil {
		fail(err)
	}
	ln, err := net.Listen("tcp", os.Args[1])
	if err != nil {
		fail(err)
	}
	if err := m.Start(ln, nil); err != nil {
		fail(err)
	}
	control := http.NewServeMux()
	control.HandleFunc("/user", func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost {
			http.Error(w, "POST only", http.StatusMethodNotAllowed)
			return
		}
		email := r.URL.Query().Get("email")
		user := &mockoidc.MockUser{
			Subject:           email,
			Email:             email,
			EmailVerified:     true,
			PreferredUsername: strings.Split(email, "@")[0],
		}
		if g := r.URL.Query().Get("groups"); g != "" {
			user.Groups = strings.Split(g, ",")
		}
		m.QueueUser(user)
		w.WriteHeader(http.StatusNoContent)
	})
	cln, err := net.Listen("tcp", os.Args[2])
	if err != nil {
		fail(err)
	}
	cfg := m.Config()
	line, _ := json.Marshal(map[string]string{
		"issuer": cfg.Issuer, "client_id": cfg.ClientID, "client_secret": cfg.ClientSecret,
	})
	fmt.Println(string(line))
	fail(http.Serve(cln, control))
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "mockoidc:", err)
	os.Exit(1)
}
