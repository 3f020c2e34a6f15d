# audit_events.py -- the article's audit example; only the decorator is new.
from blinker import Namespace
from datetime import datetime
from flask import request, g

from signal_queue import deferred

event_bus = Namespace()
access_logged = event_bus.signal('access-event')

@deferred(access_logged)
def persist_access_record(sender):
    entry_time = datetime.utcnow().isoformat()
    client_ip = request.headers.get('X-Forwarded-For', request.remote_addr)
    user_identifier = getattr(g, 'current_user', 'anonymous')
    
    log_entry = f"[{entry_time}] {user_identifier}@{client_ip} accessed {request.path}"
    
    with open('access_audit.log', 'a') as log_file:
        log_file.write(log_entry + '\n')
