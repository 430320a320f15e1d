module github.com/wsrelay/wsrelay/e2e

go 1.26.0

replace github.com/wsrelay/wsrelay/shared => ../shared
