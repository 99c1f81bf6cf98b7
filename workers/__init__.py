"""The multiprocess pool's processes: `pool` (spawn, supervise, respawn, shut down), `ingest`
(network reads and SSE framing) and `worker` (per-stream logic), wired by `protocol` records.

Kept light on purpose: children import only the module they run (see DESIGN.md section 6).
"""
