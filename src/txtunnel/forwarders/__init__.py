"""
The built-in forwarders.  Each is exposed as a plugin by a module in
C{twisted/plugins/}; nothing else imports them by name.
"""
