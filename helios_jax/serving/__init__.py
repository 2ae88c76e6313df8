"""Live streaming of Helios videos to browsers and programs over WebSockets (``python serve.py``).

Modules, one concept each:

* :mod:`~helios_jax.serving.settings` the server's options and limits;
* :mod:`~helios_jax.serving.engine` the loaded model, request resolution, the one-stream-per-device rule;
* :mod:`~helios_jax.serving.protocol` the wire format (client messages, events, error codes, JPEG frames);
* :mod:`~helios_jax.serving.uploads` uploaded start images / videos;
* :mod:`~helios_jax.serving.session` one stream: generation, encoding and recording threads;
* :mod:`~helios_jax.serving.recorder` the mp4 written while streaming;
* :mod:`~helios_jax.serving.app` the FastAPI app (page, files, WebSocket);
* :mod:`~helios_jax.serving.server` uvicorn on a bound socket, in the foreground or a background thread;
* :mod:`~helios_jax.serving.client` a Python client of the WebSocket API.

The protocol is documented in ``docs/streaming.md``. Importing this package imports neither FastAPI nor JAX;
the submodules do.
"""
