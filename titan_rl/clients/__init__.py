"""Clients of the three services: each depends only on the protos, the codec and titan_rl.rpc."""
