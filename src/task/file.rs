//! The task-file format: YAML front matter between `---` lines, then a Markdown body.
