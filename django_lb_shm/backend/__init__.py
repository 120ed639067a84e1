"""The virtual Django database backend behind the load-balanced alias.

``connections[LOAD_BALANCER['ALIAS']]`` is a wrapper of the real databases'
own backend class (so SQL is compiled exactly as for them) whose DB-API
connection is a :class:`django_lb_shm.client.session.ClientSession`: statements run in
the coordinator, not in the app process.
"""
