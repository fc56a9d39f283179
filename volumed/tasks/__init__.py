"""volumed.tasks"""
