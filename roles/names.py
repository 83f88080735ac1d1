"""How the cluster finds the roles: the Ray namespace and the actors' names. Imported by the actor
shells (roles/actors.py) and by the node lifecycle (cluster/), which connects in this namespace."""

NAMESPACE = "duet"
ARCHITECT_NAME = "duet-architect"
EXECUTOR_NAME = "duet-executor"
