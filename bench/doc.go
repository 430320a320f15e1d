// Package bench is the load generator behind `make bench`.
package bench
