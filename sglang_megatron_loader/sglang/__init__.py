"""SGLang side: the plugin entry point and the model loader (imports SGLang lazily)."""
