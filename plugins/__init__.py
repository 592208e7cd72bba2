"""The built-in plugins of tarflow, registered through the same entry point group as any other."""
