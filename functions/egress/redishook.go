package main

import (
	"context"

	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/redisconn"
)

// redisHook counts the egress's failed Redis commands and pipelines (one
// per pipeline) in wsrelay_egress_redis_errors_total: stream reads,
// registry writes, probes and readiness pings. A missing key (redis.Nil),
// a script not yet cached, a caller that gave up and the connection
// handshake's optional commands are not failures. Pub/Sub (subscribes,
// reads) runs outside go-redis's hooks: the hub counts its failed
// subscribes itself.
//
// On a cluster it is also added to each master's client (node), where it
// counts only the readiness pings, which go to every master on its own
// client (redisconn.MasterPing): the commands the cluster client routes
// there it has counted already.
type redisHook struct {
	h    *hub
	node bool
}

func (k redisHook) DialHook(next redis.DialHook) redis.DialHook {
	return next // a failed dial fails the command, counted there
}

func (k redisHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		err := next(ctx, cmd)
		if redisconn.Failed(ctx, cmd, err) && (!k.node || redisconn.MasterPing(ctx)) {
			k.h.redisErrors.Add(1)
		}
		return err
	}
}

func (k redisHook) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	if k.node {
		return next // the egress runs no pipeline on a node's client itself
	}
	return func(ctx context.Context, cmds []redis.Cmder) error {
		err := next(ctx, cmds)
		if err != nil && redisconn.PipelineFailed(ctx, cmds) {
			k.h.redisErrors.Add(1)
		}
		return err
	}
}
