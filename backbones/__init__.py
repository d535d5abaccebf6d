"""Backbone plugins: each module registers a builder with `@register_backbone(name)`."""
