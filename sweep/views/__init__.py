"""Views: the console, the report and its plots, the schedule preview and the UIs. The top
part below the CLI."""
