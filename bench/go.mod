module github.com/wsrelay/wsrelay/bench

go 1.26.0

replace github.com/wsrelay/wsrelay/shared => ../shared
