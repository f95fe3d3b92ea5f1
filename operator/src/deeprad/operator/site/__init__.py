"""The site agent: runs at a hospital, pulls its SiteTasks from the hub, runs trainer Jobs."""
