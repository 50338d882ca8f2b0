"""Backbone and heads shared by every model family."""
