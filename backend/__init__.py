"""The local inference engine: model, KV pool, radix cache, scheduler, sampler."""
