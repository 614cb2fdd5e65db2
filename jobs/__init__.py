"""Ray Job entry points (thin): `ray job submit --working-dir . -- python -m jobs.train --config ...`."""
