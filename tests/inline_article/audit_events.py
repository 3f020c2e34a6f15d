# The article's audit example exactly as published (inline receivers): the reference output.
from blinker import Namespace
from datetime import datetime
from flask import request, g

event_bus = Namespace()
access_logged = event_bus.signal('access-event')

def persist_access_record(sender):
    entry_time = datetime.utcnow().isoformat()
    client_ip = request.headers.get('X-Forwarded-For', request.remote_addr)
    user_identifier = getattr(g, 'current_user', 'anonymous')
    
    log_entry = f"[{entry_time}] {user_identifier}@{client_ip} accessed {request.path}"
    
    with open('access_audit.log', 'a') as log_file:
        log_file.write(log_entry + '\n')

access_logged.connect(persist_access_record)
