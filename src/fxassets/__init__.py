"""fxassets: distil a diffusion teacher into a tiny on-device face-effect student."""

__version__ = "0.1.0"
