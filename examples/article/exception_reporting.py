# exception_reporting.py -- the article's exception example; only the decorator is new.
from flask import got_request_exception
import traceback

from signal_queue import deferred

@deferred(got_request_exception)
def exception_reporter(sender, exception):
    error_details = traceback.format_exception_only(type(exception), exception)
    with open('error_journal.log', 'a') as error_log:
        error_log.write(f"Critical error in {sender}: {''.join(error_details)}\n")
