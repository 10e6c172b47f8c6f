-- One row per user: how many orders they placed, how many were paid for, and what they spent.
select
    u.user_id,
    u.country,
    u.plan,
    count(o.order_id) as orders,
    count(o.order_id) filter (where o.status not in ('refunded', 'cancelled')) as kept_orders,
    coalesce(sum(o.amount_cents) filter (where o.status not in ('refunded', 'cancelled')), 0)
        as revenue_cents,
    min(o.ordered_at) as first_ordered_at,
    max(o.ordered_at) as last_ordered_at
from {{ ref('stg_users') }} as u
left join {{ ref('stg_orders') }} as o on o.user_id = u.user_id
group by u.user_id, u.country, u.plan
