"""The follow-up observer's views of the broker's output, above ``broker`` and ``replay``:

``lightcurve``    an event's light curve from Redis (the offline sources, the causal PSPL
                  fit, the series every view draws and the matplotlib figure of
                  ``ulens events plot`` are ``training.event_figure``'s, shared with
                  ``ulens evaluate``'s example figures)
``web_figure``    the same series as a Plotly figure (the dashboard's event page)
``trigger_feed``  a background reader of the trigger topic (the dashboard's list)
``dashboard``     ``ulens dashboard``: the local web page
``cli_events``    ``ulens events show | list | plot``

It imports ``broker`` (Redis state, trigger decoding), ``replay`` (archival files) and
``training`` (model, PSPL fit, decision rule); none of them imports it.
"""
