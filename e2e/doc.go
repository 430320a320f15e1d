// Package e2e holds the end-to-end tests: they build the two functions'
// binaries and run them as separate processes against a real Redis.
package e2e
