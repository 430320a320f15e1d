package config

import (
	"fmt"
	"io"
	"strings"
)

// UsageError is a command line the function does not take. Its main
// exits with status 2 for it, as Go's flag package does.
type UsageError struct{ msg string }

func (e *UsageError) Error() string { return e.msg }

// Args handles a function's command line (args as os.Args). The
// configuration comes from the environment only, so the one flag is -env
// (or --env), which prints the variable names cfg reads, one a line; -h,
// -help and --help print the usage. With no argument it returns false:
// start serving. Any other argument is a *UsageError naming it, never a
// start: a function that took `--help` or a mistyped flag as "run" would
// serve (on PORT, with the environment it was given) when the operator
// asked it something.
func Args(name string, args []string, cfg any, stdout io.Writer) (done bool, err error) {
	if len(args) <= 1 {
		return false, nil
	}
	if len(args) == 2 {
		switch args[1] {
		case "-env", "--env":
			for _, n := range Names(cfg) {
				fmt.Fprintln(stdout, n)
			}
			return true, nil
		case "-h", "-help", "--help":
			fmt.Fprintf(stdout, "Usage: %s [-env]\n\n"+
				"Without arguments %s serves, configured by its environment only\n"+
				"(README.md, \"Configuration\"). -env prints the names of the variables\n"+
				"it reads, one a line.\n", name, name)
			return true, nil
		}
	}
	bad := fmt.Sprintf("unknown argument %q", args[1])
	if len(args) > 2 {
		bad = fmt.Sprintf("unknown arguments %q", strings.Join(args[1:], " "))
	}
	return true, &UsageError{bad + ": the only flag is -env, which prints the environment variables read (without arguments the function serves, configured by them; -h: usage)"}
}
