"""Code that runs inside the Ray clusters tuneserve creates (training and serving).

Never imports the operator; shares only ``tuneserve_workers.contract`` with it.
"""
