"""The site agent: runs at a hospital, pulls its SiteTasks from the hub, runs trainer Jobs.

`config` is the hospital's configuration, `training` maps a task onto the trainer's task;
`observe` reads the world, `decide` holds the rules (pure), `agent` applies them in a loop.
"""
