"""Integrations with other libraries, one submodule each, imported on demand so that
``import sftkey`` never imports them: :mod:`sftkey.integrations.transformers`."""
