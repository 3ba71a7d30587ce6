"""The training worker: ``python -m tuneserve_workers.train --config PATH``.

Modules: config (read the job), storage (URIs), data (rows -> sequences), model (base + LoRA),
fastpath (kernel hooks), loop (TrainStep and the Ray Train loop), checkpoint, progress, output,
main (the entrypoint that starts Ray Train and turns failures into a Failed progress state).
"""
