"""Method plugins: each module registers its classes with @register_method."""
