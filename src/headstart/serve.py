"""The HTTP service's public path: `from headstart.serve import create_app, ServeConfig`.

It lives in headstart.deploy.serve; FastAPI and uvicorn are imported only when an app is made
(pip install 'headstart[serve]').
"""

from headstart.deploy.serve import create_app, serve
from headstart.deploy.serve_http import ServeConfig

__all__ = ["ServeConfig", "create_app", "serve"]
