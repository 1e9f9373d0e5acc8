"""The activation portal: a small server-rendered web page over ActivationService for machine manufacturers
without a back office.  It is only a gRPC client of the service (every rule stays there).

``activation_svc.portal.app``: ``create_app(settings)``, ``start_portal(settings)``, ``serve(settings)``.
``activation_svc.portal.settings``: ``PortalSettings``, ``load_portal_settings(env=None, config=None)``.
``activation_svc.portal.forms``: what every page shares (app keys, posted forms, limits, the template);
``activation_svc.portal.shipment``: the ``/batch`` page (a shipment CSV).
Command: ``activation-svc portal [--listen HOST:PORT] [--config FILE] [--target HOST:PORT] ...``
"""
