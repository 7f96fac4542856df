"""One module per normalization placement; every module here is imported by the registry
(:func:`megaspan.norms.registry.available`), so a new file is all a new placement needs."""
