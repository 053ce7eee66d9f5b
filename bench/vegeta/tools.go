//go:build tools

// Package tools pins vegeta, the constant-rate HTTP load generator the benchmark
// (bench/bench.py) uses for latency percentiles at a fixed rate.
package tools

import _ "github.com/tsenart/vegeta/v12"
