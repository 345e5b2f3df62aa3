"""The embedded default: a small teacher and student that the project builds and ships."""
