"""Engines that can run a pairing: qspec's own loop (qspec_loop.py) and transformers' generate
and assisted generation, the peer it is timed against (transformers_peer.py). Each module's
`prepare(ctx, cell, target, drafter, prompts)` returns a Prepared (interface.py): how to run
one prompt, and how the engine was set up."""
