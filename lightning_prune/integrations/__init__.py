"""Knowledge about other libraries' layers, registered by class name (nothing here imports them)."""
